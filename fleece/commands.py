"""Command groups: service objects whose methods are QMP commands.

Each group (``Storage``'s own node and device commands, the jobs, the exports, the dirty
bitmaps, the transaction) is an object given what it uses explicitly: the :class:`Nodes` it
looks nodes up in, the event bus, and, for the transaction, the groups it drives. A method
marked with :func:`command` is a QMP command; :func:`command_table` lists a group's, and
``Storage.execute`` is the one flat entry over all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fleece.errors import NodeNotFound
from fleece.schema import Schema

if TYPE_CHECKING:
    from fleece.block.device import Device
    from fleece.block.graph import BlockGraph
    from fleece.block.node import BlockNode

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CommandSpec:
    """A command's name, its argument schema, and how the method takes the arguments:
    as keyword arguments (``-`` becomes ``_``), or, with ``whole``, as one dict."""

    name: str
    schema: Schema
    whole: bool


#: a command: the bound method that runs it and its spec
Command = tuple[Callable[..., Any], CommandSpec]


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


def command_table(group: object) -> dict[str, Command]:
    """The commands of ``group``, by name, bound to it."""
    table: dict[str, Command] = {}
    for attr in dir(type(group)):
        spec = getattr(getattr(type(group), attr), "__qmp_command__", None)
        if isinstance(spec, CommandSpec):
            table[spec.name] = (getattr(group, attr), spec)
    return table


class Nodes:
    """The block graph and the devices plugged on it: how every command group finds a node."""

    def __init__(self, graph: BlockGraph, devices: dict[str, Device]) -> None:
        self.graph = graph
        self.devices = devices

    def find(self, name: str) -> BlockNode:
        """A node by device name or node name, as QEMU's ``device`` arguments take it.

        Raises :class:`fleece.errors.NodeNotFound` (QMP class ``GenericError``, as QEMU's)."""
        device = self.devices.get(name)
        if device is not None:
            return device.node
        node = self.graph.find(name)
        if node is None:
            raise NodeNotFound(f"Cannot find device='{name}' nor node-name='{name}'")
        return node
