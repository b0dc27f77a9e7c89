"""block-stream and block-commit: merge the layers of a backing chain while the guest runs.

* ``stream`` copies into the top image every cluster it does not allocate but a layer above
  ``base`` does, then makes ``base`` the top's backing and drops the layers between.
* ``commit`` (an intermediate layer) copies what ``top`` and the layers down to ``base`` allocate
  into ``base``, then makes ``base`` the backing of ``top``'s overlay and drops the rest.

A stream copy races with guest writes to the top image: the job holds the clusters it copies
exclusively, and guest writes take the same lock, so a guest write is never overwritten by the
older data the job read. A commit writes only into ``base``, which the guest reads only where
nothing above it allocates, so the content the guest sees never changes while it runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fleece.block.chain import backing_chain, drop_intermediate
from fleece.block.driver import BlockStatus
from fleece.block.node import BlockNode, Serialiser
from fleece.block.perm import Perm
from fleece.block.rangelock import ClusterRangeLocks
from fleece.errors import GenericError
from fleece.jobs.job import Job, JobHost

CHUNK_BYTES = 4 << 20
DEFAULT_CLUSTER = 64 * 1024


def _cluster_of(node: BlockNode) -> int:
    size = node.driver.image_info().get("cluster-size")
    return size if isinstance(size, int) and size > 0 else DEFAULT_CLUSTER


class _ChainJob(Job):
    """What stream and commit share: a walk over the chain between two nodes."""

    def __init__(self, storage: JobHost, job_id: str, top: BlockNode, base: BlockNode | None,
                 **options: Any) -> None:
        super().__init__(storage, job_id, **options)
        chain = backing_chain(top)
        if base is not None and base not in chain[1:]:
            raise GenericError(f"'{base.name}' is not in the backing chain of '{top.name}'")
        self.top = top
        self.base = base
        self.between = chain[1 : chain.index(base)] if base is not None else chain[1:]
        self.len = top.size

    def _chunks(self) -> list[tuple[int, int]]:
        step = self.chunk_bytes(CHUNK_BYTES, DEFAULT_CLUSTER)
        return [(offset, min(step, self.len - offset)) for offset in range(0, self.len, step)]


class StreamJob(_ChainJob):
    kind: ClassVar[str] = "stream"

    def __init__(self, storage: JobHost, job_id: str, top: BlockNode, base: BlockNode | None,
                 **options: Any) -> None:
        super().__init__(storage, job_id, top, base, **options)
        if top.read_only:
            raise GenericError(f"Block node '{top.name}' is read-only")
        with self.guarded_setup():
            self.use_node(top, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED, Perm.all())
            for node in self.between:
                self.use_node(node, Perm.CONSISTENT_READ, Perm.all())
        self.cluster = _cluster_of(top)
        self.locks = ClusterRangeLocks()
        # Guest writes to the top hold their clusters while they run, as the stream's copies
        # do: set drained, so no write in flight escapes it.
        with top.graph.drained([top]):
            top.serialiser = Serialiser(self.locks, self.cluster)

    def run(self) -> None:
        for offset, length in self._chunks():
            self.checkpoint()
            copied = 0
            for status in self.top.extents(offset, length, above=False):
                if not status.allocated:
                    copied += self._stream_extent(status.offset, status.length)
            self.progress(length)
            self.throttle(copied)

    def _stream_extent(self, offset: int, length: int) -> int:
        first = offset // self.cluster
        end = -(-(offset + length) // self.cluster)
        start = first * self.cluster
        stop = min(end * self.cluster, self.top.size)
        copied = 0
        with self.locks.locked(first, end, exclusive=True):
            below = self.top.backing()
            for status in self.top.extents(start, stop - start, above=False):
                if status.allocated or below is None or status.offset >= below.size:
                    continue  # the guest wrote it meanwhile, or nothing below to stream
                piece = min(status.length, below.size - status.offset)
                for found in below.extents(status.offset, piece):
                    if found.depth == 0 or (self.base is not None and self._in_base(found)):
                        continue
                    data = self.top.pread(found.offset, found.length)
                    self.top.pwrite(found.offset, data, unchanged=True)
                    copied += found.length
        return copied

    def _in_base(self, status: BlockStatus) -> bool:
        """Whether ``status`` (from ``block_status_above`` of the top's backing) lies in base or
        below: depth counts from the backing, so the layers above base are 1..len(between)."""
        return bool(status.depth > len(self.between))

    def commit(self) -> None:
        drop_intermediate(self.top, self.base)

    def clean(self) -> None:
        with self.top.graph.drained([self.top]):
            if self.top.serialiser is not None and self.top.serialiser.locks is self.locks:
                self.top.serialiser = None


class CommitJob(_ChainJob):
    kind: ClassVar[str] = "commit"

    def __init__(self, storage: JobHost, job_id: str, active: BlockNode, top: BlockNode,
                 base: BlockNode, **options: Any) -> None:
        if top is active:
            raise GenericError("Active commit is not supported: 'top-node' must be below the "
                               "active layer")
        chain = backing_chain(active)
        if top not in chain:
            raise GenericError(f"'{top.name}' is not in the backing chain of '{active.name}'")
        self.overlay = chain[chain.index(top) - 1]
        super().__init__(storage, job_id, top, base, **options)
        self.between = [top, *self.between]
        self.base_node = base
        self._was_read_only = base.read_only
        with self.guarded_setup():
            for node in self.between:
                self.use_node(node, Perm.CONSISTENT_READ, Perm.all())
            base.reopen(read_only=False)
            try:
                self.use_node(base, Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
            except BaseException:
                base.reopen(read_only=self._was_read_only)
                raise

    def run(self) -> None:
        for offset, length in self._chunks():
            self.checkpoint()
            copied = 0
            for status in self.top.extents(offset, length):
                if status.depth == 0 or status.depth > len(self.between):
                    continue  # not allocated above base
                if status.zero and not status.data:
                    self.base_node.pwrite_zeroes(status.offset, status.length)
                else:
                    data = self.top.pread(status.offset, status.length)
                    self.base_node.pwrite(status.offset, data)
                copied += status.length
            self.progress(length)
            self.throttle(copied)

    def commit(self) -> None:
        self.base_node.flush()
        drop_intermediate(self.overlay, self.base_node)

    def clean(self) -> None:
        if self._was_read_only and not self.base_node.closed:
            try:
                for user in self.users:
                    if user.node is self.base_node:
                        user.node.update_user(user, Perm.CONSISTENT_READ, Perm.all())
                self.base_node.reopen(read_only=True)
            except GenericError:
                pass  # stays writable; harmless, and the job's result stands
