"""The driver vtable: what every block driver implements, and the helpers they share.

A driver instance holds the open state of one node (an open file, a qcow2 image's tables). The
node (:class:`fleece.block.node.BlockNode`) does everything common before calling it: argument
and range checks, request tracking, write interception (copy-before-write). So a driver may
assume ``0 <= offset`` and ``offset + length <= size()`` for every call, and must be thread-safe:
I/O arrives from the thread pool and from a harness's vCPU threads at once.
"""

from __future__ import annotations

import builtins
import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from fleece.block.perm import ChildRole, Perm
from fleece.errors import GenericError

if TYPE_CHECKING:
    from fleece.bitmap import ClusterBitmap
    from fleece.block.cbw import CopyBeforeWrite
    from fleece.block.direct import DirectWrite
    from fleece.block.node import BlockNode


class Status(enum.IntFlag):
    """What a range of a node reads as. ``ALLOCATED`` without ``ZERO`` or ``DATA`` never occurs."""

    DATA = 0x1  # the range is backed by data somewhere (not a hole)
    ZERO = 0x2  # the range reads as zeroes
    ALLOCATED = 0x4  # this layer decides the content (else its backing child does)


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """The status of ``[offset, offset + length)``, the first extent of a query.

    ``depth`` counts layers for :meth:`BlockNode.block_status_above`: 1 is the node asked, 2 its
    backing, and so on; 0 means no layer of the chain allocates the range. ``host_offset`` is,
    when known, where the extent's bytes start in the node's ``file`` child (contiguously).
    """

    offset: int
    length: int
    flags: Status
    depth: int = 1
    host_offset: int | None = None

    @property
    def allocated(self) -> bool:
        return bool(self.flags & Status.ALLOCATED)

    @property
    def zero(self) -> bool:
        return bool(self.flags & Status.ZERO)

    @property
    def data(self) -> bool:
        return bool(self.flags & Status.DATA)


class HostMap(NamedTuple):
    """The first ``length`` bytes of a range are ``node``'s bytes from ``offset``, and stay so
    until the node asked drops its routes (its own discards and zero writes, a drained section,
    its close: see :mod:`fleece.block.route`).

    ``writable``: a write may go there too (in place, nothing else for this node to do).
    ``unless_done``: a snapshot reading through to its source. The mapping then holds only for
    the clusters (of ``cluster`` bytes) whose bit in that copied bitmap is clear, which a
    reader checks before and after it reads (a copy sets the bit before the guest's write
    reaches the source).
    ``write_guard``: copy-before-write's copied bitmap (clusters of ``cluster`` bytes), with
    ``writable``: a write may go there only where every cluster it touches is copied. A bit,
    once set, stays set while the mapping holds, so a writer that saw it set needs no lock.
    ``write_pending``: with ``write_guard``, the clusters whose copy is under way (the rest of
    a sequential writer's window): a write that finds its clusters copied or pending may wait
    a little for the copy rather than hand itself to Python.
    ``zero_copy``: the host bytes are never rewritten for *other* data while the file is
    open (a freed qcow2 cluster is punched out before it can be allocated again), so a reply
    may hand their page cache pages to the socket (``sendfile``), which the client reads
    later."""

    length: int
    node: BlockNode
    offset: int
    unless_done: ClusterBitmap | None = None
    cluster: int = 0
    #: a write of the range may go there too, with nothing else to do on this node's part
    writable: bool = False
    #: what this node's block status says of the range: True data, False not known here
    #: (say, a snapshot's own answer), None whatever the node below says (a window, a filter)
    data: bool | None = None
    #: writes only where these clusters are copied (see the class's note)
    write_guard: ClusterBitmap | None = None
    #: clusters whose copy is under way: a write there may wait for it (see the class's note)
    write_pending: ClusterBitmap | None = None
    #: the pages may be sent without a copy (see the class's note)
    zero_copy: bool = True


class Options:
    """Reads a driver's options the way QEMU's QAPI visitor does, naming what is wrong.

    ``finish()`` refuses any option nobody asked for ("Parameter 'x' is unexpected").
    """

    def __init__(self, options: dict[builtins.str, Any]) -> None:
        self._options = dict(options)

    def has(self, key: builtins.str) -> builtins.bool:
        return key in self._options

    def raw(self, key: builtins.str, default: Any = None) -> Any:
        return self._options.pop(key, default)

    def str(
        self,
        key: builtins.str,
        default: builtins.str | None = None,
        *,
        required: builtins.bool = False,
    ) -> builtins.str | None:
        value = self._take(key, default, required)
        if value is not None and not isinstance(value, builtins.str):
            raise GenericError(f"Invalid parameter type for '{key}', expected: string")
        return value

    def required_str(self, key: builtins.str) -> builtins.str:
        value = self.str(key, required=True)
        assert value is not None
        return value

    def int(
        self,
        key: builtins.str,
        default: builtins.int | None = None,
        *,
        minimum: builtins.int | None = None,
    ) -> builtins.int | None:
        value = self._take(key, default, False)
        if value is None:
            return None
        if (
            isinstance(value, builtins.str) and value.lstrip("-").isdigit()
        ):  # dotted key=value input
            value = int(value)
        if isinstance(value, builtins.bool) or not isinstance(value, builtins.int):
            raise GenericError(f"Invalid parameter type for '{key}', expected: integer")
        if minimum is not None and value < minimum:
            raise GenericError(f"Parameter '{key}' expects a value of at least {minimum}")
        return value

    def bool(self, key: builtins.str, default: builtins.bool = False) -> builtins.bool:
        value = self._take(key, default, False)
        if isinstance(value, builtins.str) and value in ("on", "off", "true", "false"):
            return value in ("on", "true")
        if not isinstance(value, builtins.bool):
            raise GenericError(f"Invalid parameter type for '{key}', expected: boolean")
        return value

    def enum(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: builtins.str
    ) -> builtins.str:
        value = self.str(key, default)
        assert value is not None
        if value not in choices:
            raise GenericError(f"Parameter '{key}' does not accept value '{value}'")
        return value

    def _take(self, key: builtins.str, default: Any, required: builtins.bool) -> Any:
        if key not in self._options:
            if required:
                raise GenericError(f"Parameter '{key}' is missing")
            return default
        return self._options.pop(key)

    def finish(self) -> None:
        if self._options:
            key = sorted(self._options)[0]
            raise GenericError(f"Parameter '{key}' is unexpected")


class Driver:
    """One open node's driver state. Subclasses override what they support.

    Every I/O method raises ``OSError`` with an errno on failure. ``open`` raises
    :class:`fleece.errors.GenericError` (or :class:`fleece.errors.ImageError`) for bad options
    and images it refuses.
    """

    name: ClassVar[str] = ""
    #: writes past the end grow the node (a posix file under a growing qcow2 image)
    growable: bool = False

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    def open(self, options: Options) -> None:
        """Open the driver state from ``options``; children through ``self.node.graph``.

        ``self.node.driver`` is already this instance, so links made here get this driver's
        :meth:`child_perm`. On failure the graph closes the node and its children.
        """
        raise NotImplementedError

    # -- the vtable --------------------------------------------------------------------------
    def size(self) -> int:
        raise NotImplementedError

    def refresh_size(self) -> int:
        """Forget any cached size and ask again (growable drivers cache it)."""
        return self.size()

    def preadv(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

    def pwritev(self, offset: int, data: memoryview) -> None:
        raise OSError(errno.EROFS, f"{self.name} does not support writes")

    def begin_direct_write(self, offset: int, length: int) -> DirectWrite | None:
        """Reserve the range for a direct write (:meth:`BlockNode.begin_direct_write`); None
        when this driver cannot, which is the default."""
        return None

    def native_fua(self) -> bool:
        """True when the driver can make one write durable by itself (:meth:`pwritev_fua`, a
        file's ``RWF_DSYNC``), without flushing every other write. False, the default: a
        ``fua`` write is then a write and a flush of the node (QEMU's ``BDRV_REQ_FUA``
        emulation)."""
        return False

    def pwritev_fua(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``, durable when this returns; called only when
        :meth:`native_fua` says the driver can."""
        raise NotImplementedError(f"{self.name} makes no single write durable by itself")

    def pwrite_from_file(self, offset: int, fd: int, host: int, length: int) -> bool:
        """Write ``length`` bytes of the open host file ``fd`` from ``host`` at ``offset``
        without reading them into memory (:meth:`BlockNode.pwrite_from_file`); False when
        this driver cannot, which is the default (nothing was written)."""
        return False

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeroes; ``may_unmap`` allows a hole instead of written zeroes."""
        zeroes = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            chunk = min(end - offset, len(zeroes))
            self.pwritev(offset, zeroes[:chunk])
            offset += chunk

    def pdiscard(self, offset: int, length: int) -> None:
        """A hint: the range's content may be dropped. The default keeps it."""

    def flush(self) -> None:
        """Make completed writes durable."""

    def prepare_writes(self) -> None:
        """Writes are about to come (a backup's target): do now, off their path, what their
        first ones would otherwise wait for (a format's cluster reservation and its sync).
        Nothing, by default."""

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Status of the first extent at ``offset``, at most ``length`` bytes, in this layer."""
        return BlockStatus(offset, length, Status.DATA | Status.ALLOCATED)

    def child_perm(self, role: ChildRole, read_only: bool) -> tuple[Perm, Perm]:
        """``(perm, shared)`` this node needs on a child in ``role``.

        The default is QEMU's for formats: a backing child is only read and shares everything
        (so a fleecing target can read through to a source the guest writes); a file child is
        read, written when the node is writable, and shared with readers only.
        """
        if role & ChildRole.BACKING:
            return Perm.CONSISTENT_READ, Perm.all()
        perm = Perm.CONSISTENT_READ if read_only else Perm.CONSISTENT_READ | Perm.WRITE
        return perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """The node's users now need ``perm`` and share ``shared`` (file locks follow this)."""

    def reopen(self, read_only: bool) -> None:
        """The node is becoming read-only or read-write; drivers holding OS state adapt it."""

    def close(self) -> None:
        """Release what ``open`` took. Called once, after the last request finished."""

    # -- capabilities ------------------------------------------------------------------------
    def filtered_child(self) -> BlockNode | None:
        """The child a filter passes requests to (QEMU's ``is_filter``); None for formats and
        protocols, which is the default."""
        return None

    def posix_fd(self) -> int | None:
        """The open host file whose bytes are this node's bytes, one for one (a ``file``
        node): ``sendfile`` may serve reads from it. None, the default, for everything else."""
        return None

    def window(self) -> tuple[BlockNode, int] | None:
        """``(child, offset)`` when this node's bytes are the child's bytes from ``offset`` on,
        unchanged (``raw`` with an offset); None, the default, when they are not."""
        return None

    def host_map(self, offset: int, length: int) -> HostMap | None:
        """Where a reader that goes below the node (the native data plane) finds the start of
        ``[offset, offset + length)`` (see :class:`HostMap`); None when it must be read
        through the driver. The default follows :meth:`window`; formats map what they
        allocate themselves, snapshots what they hold."""
        window = self.window()
        if window is None:
            return None
        child, base = window
        return HostMap(length, child, base + offset, writable=True)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Drop the range's bytes from the host file now, with their page cache pages,
        whatever the node's discard option: True when done. False, the default, when the
        driver cannot (then a qcow2 image above it does not let its pages be sent without a
        copy: see ``HostMap.zero_copy``)."""
        return False

    def writes_in_place(self) -> bool:
        """For a node with a :meth:`posix_fd`: a write may go straight into that file (the
        driver keeps no record of its own writes). False, the default, for the others."""
        return False

    def copy_before_write(self) -> CopyBeforeWrite | None:
        """The copy-before-write state a filter keeps (its snapshot), or None."""
        return None

    def snapshot_of(self) -> CopyBeforeWrite | None:
        """The copy-before-write state whose snapshot this node reads (snapshot-access), or
        None: a push backup from it reports what the fleecing image holds."""
        return None

    def stop_writing_child(self) -> None:
        """A filter being removed stops needing write permission on its filtered child, so
        the users going back to that child can take it. Only filters that write override it."""

    # -- introspection -----------------------------------------------------------------------
    def filename(self) -> str:
        """The image's file name, for ``query-named-block-nodes``."""
        file = self.node.file_child()
        return file.driver.filename() if file is not None else ""

    def image_info(self) -> dict[str, Any]:
        """Format-specific fields for QEMU's ``ImageInfo`` (``cluster-size``, ...)."""
        return {}

    def change_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Record a new backing file (and format) in the image header; formats override."""
        raise GenericError(f"Driver '{self.name}' does not support backing files")

    def backing_filename(self) -> str | None:
        """The backing file name stored in the image, if any."""
        return None
