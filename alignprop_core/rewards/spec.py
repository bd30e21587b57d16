"""A reward as data: its registry name and factory arguments, with one one-line text form.

    aesthetic[head_path=/models/sac+logos+ava1-l14-linearMSE.pth]
    color_target[target=[1, 0.55, 0.1]]
    mixture[spec="aesthetic:1[toward=10], jpeg_compressibility:0.5"; standardize=true]

`RewardSpec.text()` writes that form and `RewardSpec.parse` reads it back to an equal spec, so the
same line goes into `TrainConfig.reward`, the LoRA metadata, metrics.json and the training state, and
a resumed run can tell whether it got the reward it started with. Arguments are JSON values (numbers,
booleans, null, strings, lists); objects that only exist at run time (the device, a dtype, weights
handed over in memory) are passed to the factory beside the spec and are not part of it.

`parse_value` and `parse_args` are the one reader of `key=value` text: the mixture spec's component
options and the command line's `--reward-arg` use them too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z_][\w\-]*$")
_QUOTE_NEEDED = re.compile(r'[;\[\]=,"]')


def parse_value(text: str) -> Any:
    """One argument value: a JSON value ('3', '0.5', '[1, 0, 0]', '"a b"', 'true', 'null'), also
    'none' and any capitalisation of true/false; anything else is the text itself."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_value(value: Any) -> str:
    """The text `parse_value` reads back as `value` (a string is quoted only where it must be)."""
    if isinstance(value, str):
        plain = value == value.strip() and value and not _QUOTE_NEEDED.search(value)
        return value if plain and parse_value(value) == value else json.dumps(value)
    return json.dumps(value)


def split_outside(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is outside [...] brackets and "..." strings."""
    parts, depth, start, quoted, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_args(text: str | None, what: str) -> dict[str, Any]:
    """'key=value; key=value' -> {key: value}; `what` names the owner in the error message."""
    args: dict[str, Any] = {}
    for item in split_outside(text or "", ";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{what}: {item.strip()!r} is not 'key=value'.")
        args[key] = parse_value(value)
    return args


def _plain(value: Any, where: str) -> Any:
    """`value` as the JSON value it is written as (tuples become lists, paths strings)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError:
        raise ValueError(f"{where} is a {type(value).__name__}, which a reward spec cannot record; give "
                         "a number, true/false, a string or a list, or pass it beside the spec "
                         "(a run-time argument).") from None
    return json.loads(text)


@dataclass(frozen=True)
class RewardSpec:
    """A reward by name and factory arguments (JSON values, keys sorted)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(f"reward name {self.name!r} is not a name; write e.g. 'aesthetic'.")
        args = {}
        for key in sorted(self.args):
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"reward {self.name}: argument name {key!r} is not an identifier.")
            args[key] = _plain(self.args[key], f"reward {self.name} argument {key}")
        object.__setattr__(self, "args", args)

    def text(self) -> str:
        """The one-line form, e.g. ``aesthetic[head_path=/m/head.pth]``; `parse` reads it back."""
        if not self.args:
            return self.name
        return f"{self.name}[{'; '.join(f'{k}={format_value(v)}' for k, v in self.args.items())}]"

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """Read ``name`` or ``name[key=value; ...]``."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the reward spec is empty; write a reward name, e.g. 'aesthetic', or "
                             "'name[key=value; ...]'.")
        text = text.strip()
        name, bracket, rest = text.partition("[")
        name = name.strip()
        if not NAME_RE.match(name) or (bracket and not rest.rstrip().endswith("]")):
            raise ValueError(f"cannot read the reward spec {text!r}; write 'name' or "
                             "'name[key=value; key=value]'.")
        return cls(name, parse_args(rest.rstrip()[:-1] if bracket else "", f"reward spec {text!r}"))

    @property
    def label(self) -> str:
        """A short name for titles: the reward name, or a mixture's weighted component names."""
        if self.name == "mixture" and isinstance(self.args.get("spec"), str):
            parts = []
            for component in split_outside(self.args["spec"], ","):
                head = component.split("[", 1)[0].strip()
                name, _, weight = head.partition(":")
                parts.append(f"{weight.strip() or '1'}*{name.strip()}")
            return " + ".join(parts)
        return self.name

    def __str__(self) -> str:
        return self.text()

