"""``blkdebug``: a filter that fails chosen requests, for fault drills.

Options follow QEMU's ``BlockdevOptionsBlkdebug``: ``image`` (the node filtered), ``align``, and
``inject-error`` rules ``{event, errno (default EIO), sector (default -1: any), once, immediately,
iotype, state}`` plus ``set-state`` rules ``{event, state, new_state}``. Events fire on this
node's own requests: ``read_aio`` for reads, ``write_aio`` for writes, write-zeroes and discards,
``flush_to_disk`` for flushes (QEMU fires them from the format above; for a filter right under a
format the effect is the same). A rule fails a request whose range covers its ``sector`` (512-byte
units) and whose I/O type is in ``iotype`` (default: every type).
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from fleece.block.driver import BlockStatus, Driver, Options
from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole
from fleece.errors import GenericError

_IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
#: QEMU's BlkdebugEvent names; only some fire in fleece (see the module note), all are accepted
EVENTS = frozenset(
    "l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l2_load "
    "l2_update l2_update_compressed l2_alloc_cow_read l2_alloc_write read_aio read_backing_aio "
    "read_compressed write_aio write_compressed vmstate_load vmstate_save cow_read cow_write "
    "reftable_load reftable_grow reftable_update refblock_load refblock_update "
    "refblock_update_part refblock_alloc refblock_alloc_hookup refblock_alloc_write "
    "refblock_alloc_write_blocks refblock_alloc_write_table refblock_alloc_switch_table "
    "cluster_alloc cluster_alloc_bytes cluster_free flush_to_os flush_to_disk "
    "pwritev_rmw_head pwritev_rmw_after_head pwritev_rmw_tail pwritev_rmw_after_tail pwritev "
    "pwritev_zero pwritev_done empty_image_prepare l1_shrink_write_table "
    "l1_shrink_free_l2_clusters cor_write cluster_alloc_space none".split()
)

_EVENT_OF = {
    "read": "read_aio",
    "write": "write_aio",
    "write-zeroes": "write_aio",
    "discard": "write_aio",
    "flush": "flush_to_disk",
    "block-status": "",
}


@dataclass
class InjectRule:
    event: str
    error: int
    sector: int
    once: bool
    iotypes: frozenset[str]
    state: int

    def matches(self, event: str, iotype: str, offset: int, length: int, state: int) -> bool:
        if self.event != event or iotype not in self.iotypes:
            return False
        if self.state and self.state != state:
            return False
        if self.sector < 0:
            return True
        start = self.sector * 512  # QEMU: the sector's first byte lies inside the request
        return offset <= start < offset + length


@dataclass
class SetStateRule:
    event: str
    state: int
    new_state: int


def _rule_options(rule: Any, kind: str) -> Options:
    if not isinstance(rule, dict):
        raise GenericError(f"Invalid parameter type for '{kind}', expected: object")
    return Options(rule)


class BlkdebugDriver(Driver):
    name: ClassVar[str] = "blkdebug"

    image: BlockNode

    def open(self, options: Options) -> None:
        self.image = self.node.graph.open_child(
            self.node, "image", options.raw("image"), ChildRole.FILTERED
        )
        if options.has("config"):
            raise GenericError("blkdebug 'config' files are not supported; use inject-error")
        self.growable = self.image.driver.growable
        options.int("align", None, minimum=1)
        for key in ("max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
                    "max-discard"):
            options.int(key, None, minimum=0)
        options.raw("take-child-perms")
        options.raw("unshare-child-perms")
        self._lock = threading.Lock()
        self._state = 1
        self.rules: list[InjectRule] = []
        for raw in options.raw("inject-error", []) or []:
            rule = _rule_options(raw, "inject-error")
            event = rule.required_str("event")
            if event not in EVENTS:
                raise GenericError(f"Parameter 'event' does not accept value '{event}'")
            iotypes = rule.raw("iotype", list(_IOTYPES))
            if not isinstance(iotypes, list) or not all(t in _IOTYPES for t in iotypes):
                raise GenericError("Parameter 'iotype' expects a list of I/O types")
            sector = rule.int("sector", -1)
            assert sector is not None
            self.rules.append(
                InjectRule(
                    event=event,
                    error=rule.int("errno", errno.EIO, minimum=1) or errno.EIO,
                    sector=sector,
                    once=rule.bool("once", False),
                    iotypes=frozenset(iotypes),
                    state=rule.int("state", 0) or 0,
                )
            )
            rule.bool("immediately", False)
            rule.finish()
        self.transitions: list[SetStateRule] = []
        for raw in options.raw("set-state", []) or []:
            rule = _rule_options(raw, "set-state")
            event = rule.required_str("event")
            if event not in EVENTS:
                raise GenericError(f"Parameter 'event' does not accept value '{event}'")
            self.transitions.append(
                SetStateRule(
                    event=event,
                    state=rule.int("state", 0) or 0,
                    new_state=rule.int("new_state", 1) or 1,
                )
            )
            rule.finish()

    def _check(self, iotype: str, offset: int, length: int) -> None:
        event = _EVENT_OF[iotype]
        with self._lock:
            for rule in self.rules:
                if rule.matches(event, iotype, offset, length, self._state):
                    if rule.once:
                        self.rules.remove(rule)
                    raise OSError(rule.error, f"blkdebug: injected error on {iotype} at {offset}")
            for transition in self.transitions:
                if transition.event == event and transition.state in (0, self._state):
                    self._state = transition.new_state
                    break

    def size(self) -> int:
        return self.image.size

    def filename(self) -> str:
        return self.image.driver.filename()

    def filtered_child(self) -> BlockNode | None:
        return self.image

    def preadv(self, offset: int, buf: memoryview) -> None:
        self._check("read", offset, len(buf))
        self.image.pread_into(offset, buf)

    def pwritev(self, offset: int, data: memoryview) -> None:
        self._check("write", offset, len(data))
        self.image.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check("write-zeroes", offset, length)
        self.image.pwrite_zeroes(offset, length, may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self.image.pdiscard(offset, length)

    def flush(self) -> None:
        self._check("flush", 0, 0)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check("block-status", offset, length)
        status = self.image.block_status(offset, length)
        return BlockStatus(offset, status.length, status.flags, 1, None)
