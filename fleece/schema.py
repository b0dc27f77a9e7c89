"""A small argument schema per command, checked the way QEMU's QAPI visitor checks.

A schema maps argument names to types; a leading ``*`` marks an optional argument. Types are
QAPI's: ``str``, ``int``, ``bool``, ``number``, ``any``, ``object`` (a dict), ``array`` (a list),
or a tuple of allowed strings (an enum). A schema of ``None`` takes any arguments (the command
checks them itself, as ``blockdev-add`` does for ``BlockdevOptions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from fleece.errors import GenericError

ArgType: TypeAlias = str | tuple[str, ...]
Schema: TypeAlias = Mapping[str, ArgType] | None

_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "number": "number",
    "object": "object",
    "array": "array",
}


def _matches(value: Any, kind: ArgType) -> bool:
    if isinstance(kind, tuple):
        return isinstance(value, str) and value in kind
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    raise AssertionError(f"unknown schema type {kind!r}")


def check_arguments(schema: Schema, arguments: Mapping[str, Any]) -> None:
    """Raise ``GenericError`` naming the first missing, unexpected or mistyped argument."""
    if schema is None:
        return
    known: dict[str, tuple[ArgType, bool]] = {}
    for key, kind in schema.items():
        optional = key.startswith("*")
        known[key.lstrip("*")] = (kind, optional)
    for name, (kind, optional) in known.items():
        if name not in arguments:
            if not optional:
                raise GenericError(f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        if not _matches(value, kind):
            if isinstance(kind, tuple):
                raise GenericError(f"Parameter '{name}' does not accept value '{value}'")
            raise GenericError(
                f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES.get(kind, kind)}"
            )
    for name in arguments:  # QEMU looks for unknown members after visiting its own
        if name not in known:
            raise GenericError(f"Parameter '{name}' is unexpected")
