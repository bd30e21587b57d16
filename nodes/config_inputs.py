"""Node inputs generated from the core's config dataclasses, so node, CLI and config stay one to one.

Every field becomes an input named after it, with the field's help text as tooltip; choices come
from the core's tuples of allowed values. `build` turns the node's keyword arguments back into the
dataclass (whose validation then names any bad field). A settings node that holds some fields of a
dataclass outputs them as a dict (`pick`), which the consuming node merges into its config (`merge`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

from comfy_api.latest import io

from alignprop_core.config import (ESTIMATORS, LOSS_SHAPES, LR_SCHEDULES, MIXED_PRECISION, REWARD_AUGMENTS,
                                   TRUNCATION_STRATEGIES, with_input_names)

CHOICES = {"truncation": TRUNCATION_STRATEGIES, "loss": LOSS_SHAPES, "mixed_precision": MIXED_PRECISION,
           "lr_schedule": LR_SCHEDULES, "reward_augment": REWARD_AUGMENTS, "estimator": ESTIMATORS}
BIG = 2 ** 31 - 1


def config_inputs(cls: type, skip: tuple[str, ...] = (), prefix: str = "",
                  limits: dict[str, tuple[float, float, float]] | None = None,
                  only: tuple[str, ...] | None = None, optional: tuple[str, ...] = ()) -> list:
    """One node input per dataclass field (only those in `only` when given, none in `skip`), in
    the dataclass's order, defaults taken from `cls()`.

    `limits` gives (min, max, step) for numeric fields; other numbers are only bounded below by 0.
    Fields in `optional` become optional inputs: fields added after workflows were saved, so those
    workflows still validate (a missing input keeps the field's default).
    """
    limits = limits or {}
    defaults = cls()
    unknown = set(only or ()) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    inputs = []
    for f in fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        name, default, tip = prefix + f.name, getattr(defaults, f.name), f.metadata.get("help", "")
        common = dict(default=default, tooltip=tip, **({"optional": True} if f.name in optional else {}))
        if f.name in CHOICES:
            inputs.append(io.Combo.Input(name, options=list(CHOICES[f.name]), **common))
        elif isinstance(default, bool):
            inputs.append(io.Boolean.Input(name, **common))
        elif isinstance(default, int):
            lo, hi, step = limits.get(f.name, (0, BIG, 1))
            inputs.append(io.Int.Input(name, min=int(lo), max=int(hi), step=int(step), **common))
        elif isinstance(default, float):
            lo, hi, step = limits.get(f.name, (0.0, 1e9, 0.001))
            inputs.append(io.Float.Input(name, min=lo, max=hi, step=step, round=False, **common))
        elif isinstance(default, str):
            inputs.append(io.String.Input(name, **common))
        elif isinstance(default, tuple):
            inputs.append(io.String.Input(name, **{**common, "default": ", ".join(default),
                                                   "tooltip": tip + " (comma separated)"}))
        else:
            raise TypeError(f"no node input type for {cls.__name__}.{f.name}")
    return inputs


def build(cls: type, kwargs: dict[str, Any], prefix: str = "", **fixed: Any) -> Any:
    """The dataclass from node keyword arguments (fields not given keep their defaults)."""
    values = dict(fixed)
    defaults = cls()
    for f in fields(cls):
        if prefix + f.name in kwargs and f.name not in values:
            value = kwargs[prefix + f.name]
            if isinstance(getattr(defaults, f.name), tuple) and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            values[f.name] = value
    try:
        return cls(**values)
    except ValueError as err:  # name the node input, not the dataclass field behind it
        raise with_input_names(err, _input_names(cls, prefix)) from err


def pick(cls: type, kwargs: dict[str, Any], only: tuple[str, ...]) -> dict[str, Any]:
    """The fields `only` of the dataclass built from `kwargs` (so each value is checked as the
    dataclass checks it, next to defaults for the rest): a settings node's output."""
    cfg = build(cls, kwargs)
    return {name: getattr(cfg, name) for name in only}


def merge(cfg: Any, *settings: dict[str, Any] | None) -> Any:
    """`cfg` with the fields of each settings dict (None: a socket left unconnected, which keeps
    the defaults), checked again together, since some checks span fields of different nodes."""
    values = {name: value for part in settings if part for name, value in part.items()}
    try:
        return dataclasses.replace(cfg, **values)
    except ValueError as err:
        raise with_input_names(err, _input_names(type(cfg))) from err


def _input_names(cls: type, prefix: str = "") -> dict[str, str]:
    return {f"{cls.__name__}.{f.name}": prefix + f.name for f in fields(cls)}
