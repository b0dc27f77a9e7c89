"""Backing chains: walking them, and dropping the layers between two nodes."""

from __future__ import annotations

from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole
from fleece.errors import GenericError


def backing_chain(top: BlockNode) -> list[BlockNode]:
    """``[top, top's backing, its backing, ...]``."""
    chain = [top]
    node = top.backing()
    while node is not None:
        if node in chain:
            raise GenericError(f"Backing chain of '{top.name}' loops at '{node.name}'")
        chain.append(node)
        node = node.backing()
    return chain


def drop_intermediate(top: BlockNode, base: BlockNode | None) -> list[BlockNode]:
    """Make ``base`` the backing of ``top`` (``None``: no backing) and drop the layers between.

    The image header of ``top`` is rewritten to name ``base``'s file first, so a crash leaves
    either the old chain or the new one. The dropped nodes lose the link's reference and close
    unless someone else still uses them. Returns the nodes that were between.
    Raises ``GenericError`` when ``base`` is not below ``top``.
    """
    chain = backing_chain(top)
    if base is not None and base not in chain[1:]:
        raise GenericError(f"'{base.name}' is not in the backing chain of '{top.name}'")
    between = chain[1 : chain.index(base)] if base is not None else chain[1:]
    if base is None:
        top.driver.change_backing_file(None, None)
        top.detach_child("backing")
    else:
        top.driver.change_backing_file(base.driver.filename(), base.driver_name)
        top.attach_child("backing", base, ChildRole.BACKING)
    return between
