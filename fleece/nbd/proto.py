"""The NBD protocol, server side, sans-I/O: bytes in, typed events and bytes out.

Design note: :class:`ServerConnection` owns the receive buffer. The transport asks it for a
buffer to read into (:meth:`ServerConnection.get_buffer`, as ``asyncio.BufferedProtocol`` does)
and reports how many bytes arrived (:meth:`ServerConnection.buffer_updated`), which returns the
events those bytes complete; :meth:`ServerConnection.receive_data` does the same for bytes held
elsewhere (tests). Request headers are parsed many at a time by :mod:`fleece.nbdframe`; a WRITE
payload is read straight into its own ``bytearray`` and the request is only reported once the
whole payload is in, so a client that vanishes mid-payload never gets a partial write applied.

Memory follows what the client sent, never what it announced: the receive buffer starts at
``RECV_BUFFER_INITIAL`` and doubles (up to ``RECV_BUFFER``) only when a read filled it or an
option needs the room; a WRITE payload grows as its bytes arrive (at most twice what arrived);
a WRITE that is refused (read-only export, out of range) is answered at once and its payload
discarded as it arrives, never stored. Negotiation replies and the error replies to invalid
requests are queued and drained by :meth:`ServerConnection.data_to_send`; once more than
``OUTPUT_LIMIT`` bytes of them are queued, :meth:`ServerConnection.buffer_updated` stops
interpreting input (:attr:`ServerConnection.output_blocked`) until the caller drained them and
calls :meth:`ServerConnection.resume`, so a client that sends without reading cannot make the
server queue more than that, whatever it asks. Replies to requests that the server executed are
built by
the ``*_reply`` methods, which are safe to call from any thread (they read nothing that changes
during transmission) and return buffers to send without joining header and data.

Only fixed newstyle negotiation is offered (a client that does not set the fixed-newstyle bit is
served ``NBD_OPT_EXPORT_NAME`` and disconnected on anything it cannot be answered about).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleece import nbdframe
from fleece.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_ERROR_MESSAGE,
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    NBDErr,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

#: the most the receive buffer grows to (an option's data is at most 64 KiB)
RECV_BUFFER = 256 * 1024
#: what the receive buffer starts with: enough for a handshake and a burst of request headers
RECV_BUFFER_INITIAL = 4 * 1024
#: a WRITE payload's buffer grows by at least this much (and at most doubles) as bytes arrive
PAYLOAD_STEP = 64 * 1024
#: interpreting input stops while this many bytes of negotiation or error replies are queued
OUTPUT_LIMIT = 64 * 1024
#: request headers parsed per batch (the output limit is checked between batches)
REQUEST_BATCH = 1024
_REQUEST_SIZE = 28

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What negotiation needs to know about an export. ``contexts`` lists the meta contexts it
    offers, in the order that gives their ids (``base:allocation`` is id 1 when offered)."""

    name: str
    description: str
    size: int
    read_only: bool
    multi_conn: bool = False
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = MAX_PAYLOAD


class ExportDirectory(Protocol):
    """Where a connection looks exports up; called on the connection's thread only."""

    def find(self, name: str) -> ExportInfo | None:
        """The export called ``name``, or None."""

    def all(self) -> Iterable[ExportInfo]:
        """Every export, for ``NBD_OPT_LIST``."""


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExportSelected:
    """Negotiation is over (``GO`` or ``EXPORT_NAME``): requests for ``export`` follow.
    ``contexts`` maps the negotiated meta context ids to their names."""

    export: ExportInfo
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for TLS and the ACK is queued: send it, upgrade the transport, then call
    :meth:`ServerConnection.tls_started`. No byte may be fed in between."""


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request to execute; the server must answer it with one of the ``*_reply``
    methods. ``payload`` is the complete data of a WRITE (None for other commands)."""

    cookie: int
    command: Cmd
    flags: CmdFlag
    offset: int
    length: int
    payload: bytearray | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection once :meth:`ServerConnection.data_to_send` is sent. ``error`` is
    True for a protocol violation, False for an orderly ``NBD_CMD_DISC``/``NBD_OPT_ABORT``."""

    reason: str
    error: bool = True


Event = ExportSelected | StartTLS | Request | Disconnect


class Phase(enum.Enum):
    """Where a connection is; bytes are interpreted according to it."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _OptionError(Exception):
    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep


def transmission_flags(export: ExportInfo, structured: bool) -> TransmissionFlag:
    """The flags advertised for ``export``: multi-conn only when it offers it (read-only
    exports), ``SEND_DF`` only with structured replies."""
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_CACHE
    )
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= (
            TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if export.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


def _encode_message(message: str) -> bytes:
    return message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]


class ServerConnection:
    """One client connection, from the greeting to the disconnect (see the module note).

    ``tls`` makes TLS mandatory: until ``STARTTLS`` every option but ``STARTTLS`` and ``ABORT``
    is answered ``NBD_REP_ERR_TLS_REQD``, and ``EXPORT_NAME`` disconnects.
    """

    def __init__(self, directory: ExportDirectory, *, tls: bool = False) -> None:
        self.directory = directory
        self.tls_required = tls
        self.tls_done = False
        self.phase = Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        #: the negotiated meta contexts: id -> name
        self.contexts: dict[int, str] = {}
        self._contexts_export: str | None = None
        self._out = bytearray(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE
                        | HandshakeFlag.NO_ZEROES)
        )
        self._buf = bytearray(RECV_BUFFER_INITIAL)
        self._start = 0
        self._end = 0
        #: the receive buffer doubles at the next get_buffer (the last read filled it)
        self._grow = False
        #: bytes the item being received needs in the buffer (an option: header and data)
        self._need = 0
        self._payload: bytearray | None = None
        self._filled = 0
        self._write: tuple[int, int, int, int] | None = None  # flags, cookie, offset, length
        #: payload bytes of a refused WRITE still to be discarded
        self._skip = 0
        #: interpreting stops while the queued output is above OUTPUT_LIMIT (see buffer_updated)
        self._limit_output = True
        self._blocked = False

    # -- bytes in ------------------------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the client go (never empty); report them with
        :meth:`buffer_updated`."""
        payload = self._payload
        if payload is not None:
            assert self._write is not None
            filled, length = self._filled, self._write[3]
            if filled == len(payload):  # grow with what arrives: at most double, never past
                payload.extend(bytes(min(length - filled, max(PAYLOAD_STEP, filled))))
            return memoryview(payload)[filled:]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf) or (self._start and len(self._buf) - self._end < 4096):
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start:self._end]
            self._start, self._end = 0, pending
        size = len(self._buf)
        want = min(size * 2, RECV_BUFFER) if self._grow else size
        want = max(want, self._start + self._need)  # an option is at most 64 KiB + 16
        if want == size == self._end:  # never offer an empty buffer
            want = size + RECV_BUFFER_INITIAL
        if want > size:
            self._buf.extend(bytes(want - size))
        self._grow = False
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` arrived in the buffer from :meth:`get_buffer`; the events they complete.
        Stops early while more than ``OUTPUT_LIMIT`` bytes of replies are queued
        (:attr:`output_blocked`): drain them, then call :meth:`resume`."""
        if self._payload is not None:
            self._filled += nbytes
            assert self._write is not None
            if self._filled < self._write[3]:
                return []
            events: list[Event] = []
            self._finish_write(events)
            if self._start < self._end:
                events += self._process()
            return events
        self._end += nbytes
        if self._end == len(self._buf) and len(self._buf) < RECV_BUFFER:
            self._grow = True  # the client sends faster than we read: read more at a time
        return self._process()

    @property
    def output_blocked(self) -> bool:
        """True when input waits because too many replies are queued: drain
        :meth:`data_to_send`, then call :meth:`resume`."""
        return self._blocked

    def resume(self) -> list[Event]:
        """Go on interpreting the input held back by :attr:`output_blocked`; its events."""
        if not self._blocked:
            return []
        return self._process()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed ``data`` (any amount); returns the events it completes, in order. Unlike
        :meth:`buffer_updated` it never stops for queued output (the caller holds all the input
        already)."""
        view = memoryview(data).cast("B")
        events: list[Event] = []
        self._limit_output = False
        try:
            if self._blocked:
                events += self._process()
            while view:
                if self.phase is Phase.CLOSED:
                    break
                if self.phase is Phase.TLS_HANDSHAKE:
                    events.append(self._close("data arrived before the TLS handshake"))
                    break
                with self.get_buffer(len(view)) as target:  # released: the buffer may grow
                    count = min(len(target), len(view))
                    target[:count] = view[:count]
                view = view[count:]
                events += self.buffer_updated(count)
        finally:
            self._limit_output = True
        return events

    def release(self) -> None:
        """The connection is gone: drop every buffer now (input, payload, queued output)."""
        self.phase = Phase.CLOSED
        self._buf = bytearray(RECV_BUFFER_INITIAL)
        self._start = self._end = self._need = self._skip = 0
        self._payload = None
        self._write = None
        self._blocked = False
        self._out = bytearray()

    def take_input(self) -> bytes | None:
        """Hand over the input received but not interpreted yet (transmission only), for a
        reader that takes the socket over; None, keeping it, while a WRITE payload or a
        refused one is half read (the reader must then stay)."""
        if self._payload is not None or self._skip or self.phase is not Phase.TRANSMISSION:
            return None
        data = bytes(self._buf[self._start:self._end])
        self._start = self._end = 0
        self._blocked = False
        return data

    def data_to_send(self) -> bytes:
        """The queued negotiation replies and error replies (empty when there are none)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The transport now speaks TLS: negotiation starts over (the spec forgets everything
        negotiated before ``STARTTLS``). Bytes fed from now on are the decrypted stream.
        ``RuntimeError`` unless a ``StartTLS`` event is pending."""
        if self.phase is not Phase.TLS_HANDSHAKE:
            raise RuntimeError(f"tls_started in phase {self.phase.value}")
        self.phase = Phase.OPTIONS
        self.tls_done = True
        self.structured = False
        self.contexts = {}
        self._contexts_export = None

    # -- the phases ----------------------------------------------------------------------------
    def _close(self, reason: str, error: bool = True) -> Disconnect:
        self.phase = Phase.CLOSED
        self._start = self._end = self._need = self._skip = 0
        self._payload = None
        self._write = None
        self._blocked = False
        return Disconnect(reason, error)

    def _process(self) -> list[Event]:
        events: list[Event] = []
        self._blocked = False
        while True:
            phase = self.phase
            if self._skip:  # the payload of a refused WRITE: dropped as it arrives
                dropped = min(self._skip, self._end - self._start)
                self._start += dropped
                self._skip -= dropped
                if self._skip:
                    return events
            if (
                self._limit_output
                and len(self._out) >= OUTPUT_LIMIT
                and phase in (Phase.OPTIONS, Phase.TRANSMISSION)
                and self._start < self._end
            ):
                self._blocked = True
                return events
            if phase is Phase.TRANSMISSION:
                if not self._requests(events):
                    return events
            elif phase is Phase.OPTIONS:
                if not self._option(events):
                    return events
            elif phase is Phase.CLIENT_FLAGS:
                if self._end - self._start < 4:
                    return events
                (flags,) = _U32.unpack_from(self._buf, self._start)
                self._start += 4
                if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                    events.append(self._close(f"unknown client flags 0x{flags:08x}"))
                    return events
                self.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
                self.phase = Phase.OPTIONS
            elif phase is Phase.TLS_HANDSHAKE:
                if self._start < self._end:
                    events.append(self._close("data arrived before the TLS handshake"))
                return events
            else:  # CLOSED: whatever comes is dropped
                self._start = self._end = 0
                return events

    # -- negotiation ---------------------------------------------------------------------------
    def _reply(self, opt: int, rep: Rep, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data))
        self._out += data

    def _option(self, events: list[Event]) -> bool:
        avail = self._end - self._start
        if avail < 16:
            return False
        magic, opt, length = _OPT_HEADER.unpack_from(self._buf, self._start)
        if magic != IHAVEOPT:
            events.append(self._close(f"bad option magic 0x{magic:016x}"))
            return False
        if length > MAX_OPTION_LENGTH:
            events.append(self._close(f"option {opt} of {length} bytes is too long"))
            return False
        if avail < 16 + length:
            self._need = 16 + length  # the buffer grows to hold the whole option
            return False
        self._need = 0
        data = bytes(self._buf[self._start + 16:self._start + 16 + length])
        self._start += 16 + length
        try:
            self._handle_option(opt, data, events)
        except _OptionError as exc:
            self._reply(opt, exc.rep, _encode_message(str(exc)))
        # Go on in the new phase too: requests that came in the same chunk as the GO or
        # EXPORT_NAME that ended negotiation must be parsed now, not when more bytes arrive.
        return self.phase in (Phase.OPTIONS, Phase.TRANSMISSION)

    def _handle_option(self, opt: int, data: bytes, events: list[Event]) -> None:
        if self.tls_required and not self.tls_done and opt not in (Opt.STARTTLS, Opt.ABORT):
            if opt == Opt.EXPORT_NAME:
                events.append(self._close("NBD_OPT_EXPORT_NAME before STARTTLS"))
                return
            raise _OptionError(Rep.ERR_TLS_REQD, "TLS is required before this option")
        if opt == Opt.EXPORT_NAME:
            self._export_name(data, events)
        elif opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            events.append(self._close("the client aborted the negotiation", error=False))
        elif not self.fixed_newstyle:
            events.append(self._close(f"option {opt} from a client without fixed newstyle"))
        elif opt == Opt.LIST:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            for export in self.directory.all():
                name = export.name.encode()
                self._reply(opt, Rep.SERVER, _U32.pack(len(name)) + name
                            + export.description.encode())
            self._reply(opt, Rep.ACK)
        elif opt == Opt.STARTTLS:
            if not self.tls_required:
                raise _OptionError(Rep.ERR_UNSUP, "TLS is not configured on this server")
            if self.tls_done:
                raise _OptionError(Rep.ERR_INVALID, "TLS is already negotiated")
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            if self._start < self._end:
                events.append(self._close("data after NBD_OPT_STARTTLS, before the handshake"))
                return
            self._reply(opt, Rep.ACK)
            self.phase = Phase.TLS_HANDSHAKE
            events.append(StartTLS())
        elif opt in (Opt.INFO, Opt.GO):
            self._info(opt, data, events)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured:
                raise _OptionError(Rep.ERR_INVALID, "structured replies are already negotiated")
            self.structured = True
            self._reply(opt, Rep.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            raise _OptionError(Rep.ERR_UNSUP, f"option {opt} is not supported")

    def _find(self, name: str) -> ExportInfo:
        export = self.directory.find(name)
        if export is None:
            raise _OptionError(Rep.ERR_UNKNOWN, f"export '{name}' not present")
        return export

    def _enter_transmission(self, export: ExportInfo, events: list[Event]) -> None:
        if self._contexts_export != export.name:
            self.contexts = {}
        self.export = export
        self.phase = Phase.TRANSMISSION
        events.append(ExportSelected(export, self.structured, dict(self.contexts)))

    def _export_name(self, data: bytes, events: list[Event]) -> None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            events.append(self._close("export name is not UTF-8"))
            return
        export = self.directory.find(name)
        if export is None:
            events.append(self._close(f"export '{name}' not present"))
            return
        self._out += struct.pack(">QH", export.size, transmission_flags(export, self.structured))
        if not self.no_zeroes:
            self._out += bytes(124)
        self._enter_transmission(export, events)

    @staticmethod
    def _name(data: bytes, pos: int) -> tuple[str, int]:
        if len(data) < pos + 4:
            raise _OptionError(Rep.ERR_INVALID, "option data too short for a name length")
        (length,) = _U32.unpack_from(data, pos)
        pos += 4
        if length > MAX_NAME_LENGTH:
            raise _OptionError(Rep.ERR_TOO_BIG, f"name of {length} bytes is too long")
        if len(data) < pos + length:
            raise _OptionError(Rep.ERR_INVALID, "name runs past the option data")
        try:
            return data[pos:pos + length].decode("utf-8"), pos + length
        except UnicodeDecodeError:
            raise _OptionError(Rep.ERR_INVALID, "name is not UTF-8") from None

    def _info(self, opt: int, data: bytes, events: list[Event]) -> None:
        name, pos = self._name(data, 0)
        if len(data) < pos + 2:
            raise _OptionError(Rep.ERR_INVALID, "option data too short for the request count")
        (count,) = _U16.unpack_from(data, pos)
        pos += 2
        if len(data) != pos + 2 * count:
            raise _OptionError(Rep.ERR_INVALID, "information request count does not match")
        requested = {_U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}
        export = self._find(name)
        flags = transmission_flags(export, self.structured)
        self._reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, export.size, flags))
        if Info.NAME in requested:
            self._reply(opt, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requested and export.description:
            self._reply(opt, Rep.INFO, _U16.pack(Info.DESCRIPTION) + export.description.encode())
        self._reply(
            opt,
            Rep.INFO,
            struct.pack(">HIII", Info.BLOCK_SIZE, export.min_block_size,
                        export.preferred_block_size, export.max_block_size),
        )
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._enter_transmission(export, events)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            raise _OptionError(Rep.ERR_INVALID, "meta contexts need structured replies first")
        name, pos = self._name(data, 0)
        if len(data) < pos + 4:
            raise _OptionError(Rep.ERR_INVALID, "option data too short for the query count")
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(count):
            query, pos = self._name(data, pos)
            queries.append(query)
        if pos != len(data):
            raise _OptionError(Rep.ERR_INVALID, "trailing bytes after the queries")
        export = self._find(name)
        ids = {context: i + 1 for i, context in enumerate(export.contexts)}
        chosen: dict[int, str] = {}
        if opt == Opt.LIST_META_CONTEXT:
            for context in export.contexts:
                if not queries or any(
                    context == q or (q.endswith(":") and context.startswith(q)) for q in queries
                ):
                    chosen[ids[context]] = context
        else:
            for query in queries:
                if query in ids:
                    chosen[ids[query]] = query
        for context_id, context in chosen.items():
            self._reply(opt, Rep.META_CONTEXT, _U32.pack(context_id) + context.encode())
        self._reply(opt, Rep.ACK)
        if opt == Opt.SET_META_CONTEXT:
            self.contexts = chosen
            self._contexts_export = export.name

    # -- transmission --------------------------------------------------------------------------
    def _error_now(self, cookie: int, error: NBDErr, message: str) -> None:
        self._out += self.error_reply(cookie, error, message)

    def _requests(self, events: list[Event]) -> bool:
        end = min(self._end, self._start + REQUEST_BATCH * _REQUEST_SIZE)
        try:
            requests, consumed = nbdframe.parse_requests(self._buf, self._start, end)
        except nbdframe.BadMagic as exc:
            events.append(self._close(str(exc)))
            return False
        self._start += consumed
        if not requests:
            return False
        for flags, kind, cookie, offset, length in requests:
            if kind == Cmd.WRITE:
                return self._begin_write(flags, cookie, offset, length, events)
            problem = self._check(flags, kind, offset, length)
            if problem is not None:
                self._error_now(cookie, *problem)
                continue
            if kind == Cmd.DISC:
                events.append(self._close("the client disconnected", error=False))
                return False
            events.append(Request(cookie, Cmd(kind), CmdFlag(flags), offset, length))
        return True

    def _check(self, flags: int, kind: int, offset: int, length: int) -> tuple[NBDErr, str] | None:
        export = self.export
        assert export is not None
        allowed = _ALLOWED_FLAGS.get(kind)
        if allowed is None:
            return NBDErr.EINVAL, f"unsupported command {kind}"
        if flags & ~int(allowed) & 0xFFFF:
            return NBDErr.EINVAL, f"unsupported flags 0x{flags:x} for command {Cmd(kind).name}"
        if flags & CmdFlag.DF and not self.structured:
            return NBDErr.EINVAL, "DF needs structured replies"
        end = offset + length
        if kind == Cmd.READ:
            if length > MAX_PAYLOAD:
                return NBDErr.EINVAL, f"read of {length} bytes exceeds {MAX_PAYLOAD}"
            if end > export.size:
                return NBDErr.EINVAL, f"read past the end of the export ({export.size} bytes)"
        elif kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
            if export.read_only:
                return NBDErr.EPERM, "the export is read-only"
            if end > export.size:  # the NBD spec: ENOSPC for writes, EINVAL for a trim
                if kind == Cmd.TRIM:
                    return NBDErr.EINVAL, f"trim past the end of the export ({export.size} bytes)"
                return NBDErr.ENOSPC, f"write past the end of the export ({export.size} bytes)"
        elif kind == Cmd.CACHE:
            if end > export.size:
                return NBDErr.EINVAL, f"cache past the end of the export ({export.size} bytes)"
        elif kind == Cmd.BLOCK_STATUS:
            if not self.contexts:
                return NBDErr.EINVAL, "no meta context was negotiated"
            if length == 0:
                return NBDErr.EINVAL, "block status of 0 bytes"
            if end > export.size:
                return NBDErr.EINVAL, f"block status past the end ({export.size} bytes)"
        return None

    def _begin_write(
        self, flags: int, cookie: int, offset: int, length: int, events: list[Event]
    ) -> bool:
        if length > MAX_PAYLOAD:
            events.append(self._close(f"write of {length} bytes exceeds {MAX_PAYLOAD}"))
            return False
        have = min(length, self._end - self._start)
        problem = self._check(flags, Cmd.WRITE, offset, length)
        if problem is not None:
            # Refused at once; its payload is read and dropped, never stored.
            self._error_now(cookie, *problem)
            self._start += have
            self._skip = length - have
            return not self._skip
        self._write = (flags, cookie, offset, length)
        payload = bytearray(self._buf[self._start:self._start + have])
        self._start += have
        self._payload, self._filled = payload, have
        if have < length:
            return False
        self._finish_write(events)
        return True

    def _finish_write(self, events: list[Event]) -> None:
        assert self._write is not None and self._payload is not None
        flags, cookie, offset, length = self._write
        payload = self._payload
        self._payload, self._write = None, None
        events.append(Request(cookie, Cmd.WRITE, CmdFlag(flags), offset, length, payload))

    # -- replies (thread-safe: they read only what transmission never changes) -----------------
    def ok_reply(self, cookie: int) -> bytes:
        """Success without data."""
        if self.structured:
            return nbdframe.structured_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)
        return nbdframe.simple_reply(0, cookie)

    def error_reply(
        self, cookie: int, error: NBDErr, message: str = "", offset: int | None = None
    ) -> bytes:
        """A failure; structured replies carry ``message`` (and ``offset``, when given)."""
        if not self.structured:
            return nbdframe.simple_reply(error, cookie)
        text = _encode_message(message)
        if offset is None:
            return nbdframe.error_chunk(ReplyFlag.DONE, cookie, error, text)
        return nbdframe.error_offset_chunk(ReplyFlag.DONE, cookie, error, text, offset)

    def read_reply(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """A successful read of ``data`` at ``offset``, as one chunk (header, then data)."""
        if not self.structured:
            return [nbdframe.simple_reply(0, cookie), data]
        if not len(data):
            return [nbdframe.structured_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)]
        return [nbdframe.data_chunk_header(ReplyFlag.DONE, cookie, offset, len(data)), data]

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a successful read of ``length`` bytes (> 0) at ``offset``, for a
        sender that writes the data itself (``sendfile``)."""
        if not self.structured:
            return bytes(nbdframe.simple_reply(0, cookie))
        return bytes(nbdframe.data_chunk_header(ReplyFlag.DONE, cookie, offset, length))

    def sparse_read_reply(
        self,
        cookie: int,
        pieces: Sequence[tuple[int, int, bytes | bytearray | memoryview | None]],
        error: tuple[NBDErr, str, int] | None = None,
    ) -> list[bytes | bytearray | memoryview]:
        """A structured read as ``(offset, length, data or None for a hole)`` pieces, in order,
        optionally ended by an ``ERROR_OFFSET`` chunk ``(error, message, offset)``.
        ``ValueError`` without structured replies."""
        if not self.structured:
            raise ValueError("sparse reads need structured replies")
        out: list[bytes | bytearray | memoryview] = []
        last = len(pieces) - 1
        for i, (offset, length, data) in enumerate(pieces):
            flags = ReplyFlag.DONE if i == last and error is None else 0
            if data is None:
                out.append(nbdframe.hole_chunk(flags, cookie, offset, length))
            else:
                out.append(nbdframe.data_chunk_header(flags, cookie, offset, length))
                out.append(data)
        if error is not None:
            err, message, offset = error
            out.append(nbdframe.error_offset_chunk(ReplyFlag.DONE, cookie, err,
                                                   _encode_message(message), offset))
        elif not pieces:
            out.append(nbdframe.structured_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0))
        return out

    def block_status_reply(
        self, cookie: int, replies: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> bytes:
        """One ``BLOCK_STATUS`` chunk per ``(context id, [(length, flags), ...])``; the last
        carries ``DONE``."""
        out = bytearray()
        last = len(replies) - 1
        for i, (context_id, extents) in enumerate(replies):
            flags = ReplyFlag.DONE if i == last else 0
            out += nbdframe.block_status_chunk(flags, cookie, context_id, extents)
        return bytes(out)


__all__ = [
    "ALLOCATION_DEPTH",
    "BASE_ALLOCATION",
    "Disconnect",
    "Event",
    "ExportDirectory",
    "ExportInfo",
    "ExportSelected",
    "Phase",
    "Request",
    "ServerConnection",
    "StartTLS",
    "transmission_flags",
]
