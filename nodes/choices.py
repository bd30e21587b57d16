"""Dropdown values checked by the node itself: ComfyUI 0.3.75 does not check the COMBO inputs of
these nodes against their options, so a typo in an API prompt would otherwise reach the core."""
from __future__ import annotations

from typing import Any, Sequence


def check_choice(value: Any, options: Sequence[str], name: str) -> str:
    """`value` if it is one of `options`; ValueError naming the input and listing the options."""
    if value not in options:
        shown = ", ".join(repr(o) for o in list(options)[:12]) + (", ..." if len(options) > 12 else "")
        raise ValueError(f"{name}={value!r} is not one of its options ({shown}); pick one from the "
                         "dropdown.")
    return value


def check_combos(schema, values: dict[str, Any]) -> None:
    """Check every COMBO input of a node's `io.Schema` that was given a value."""
    from comfy_api.latest import io

    for item in schema.inputs:
        if isinstance(item, io.Combo.Input) and item.id in values and values[item.id] is not None:
            check_choice(values[item.id], item.options, item.id)
