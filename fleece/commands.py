"""Marking methods as QMP commands, for ``Storage`` and the command groups mixed into it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fleece.qmp.schema import Schema

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CommandSpec:
    """A command's name, its argument schema, and how the method takes the arguments:
    as keyword arguments (``-`` becomes ``_``), or, with ``whole``, as one dict."""

    name: str
    schema: Schema
    whole: bool


def command(name: str, schema: Schema, *, whole: bool | None = None) -> Callable[[F], F]:
    """Mark a method as the QMP command ``name`` with its argument ``schema``.

    A schema of ``None`` (the method checks the arguments itself), or ``whole=True``, passes the
    arguments as one dict; otherwise as keyword arguments.
    """

    def mark(method: F) -> F:
        method.__qmp_command__ = CommandSpec(  # type: ignore[attr-defined]
            name, schema, schema is None if whole is None else whole
        )
        return method

    return mark
