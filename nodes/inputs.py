"""Every value a node receives is checked against its own declaration before the node runs: text
bounded and NUL-free, numbers finite and within the widget's min and max. ComfyUI checks the
ranges of what its frontend sends, but a graph posted to /prompt may carry NaN (Python's JSON
reads it) or text of any length; the check is built from INPUT_TYPES, so a node added later has it."""

from __future__ import annotations

import functools
from typing import Any, Protocol

from ..common.values import MAX_TEXT_LENGTH, Bounds, check_number, check_text
from . import comfy_env

# Multiline inputs hold sample prompts or extra flags: longer than a name or a path can be, still bounded.
MAX_MULTILINE_LENGTH = 1 << 20


class NodeClass(Protocol):
    """What ComfyUI reads of a node class: its declared inputs and the name of the method it runs."""

    FUNCTION: str

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]: ...


def check_node_inputs(node_class: type[NodeClass], values: dict[str, Any]) -> None:
    """Raise ValueCheckError naming the first input of `node_class` whose value does not fit its declaration."""
    declared = node_class.INPUT_TYPES()
    for name, spec in {**declared.get("required", {}), **declared.get("optional", {})}.items():
        value = values.get(name)
        kind, settings = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if isinstance(value, str):
            if "\0" in value and settings.get(comfy_env.PATH_INPUT):
                continue  # comfy_env.confine refuses it, naming it as the path it is meant to be
            check_text(value, f"input {name}", MAX_MULTILINE_LENGTH if settings.get("multiline") else MAX_TEXT_LENGTH)
        elif kind in ("INT", "FLOAT") and isinstance(value, (int, float)) and not isinstance(value, bool):
            check_number(
                value, Bounds(settings.get("min", -float("inf")), settings.get("max", float("inf"))), f"input {name}"
            )


def with_checked_inputs(node_class: type[NodeClass]) -> type[NodeClass]:
    """Make `node_class`'s function check its inputs first (ComfyUI passes them by name)."""
    function = getattr(node_class, node_class.FUNCTION)

    @functools.wraps(function)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_node_inputs(node_class, kwargs)
        return function(self, *args, **kwargs)

    setattr(node_class, node_class.FUNCTION, run)
    return node_class
