"""The sans-I/O NBD server protocol fed bytes (no sockets), and the client against the server."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from fleece.nbd.client import NBDClient, NBDError
from fleece.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Info,
    NBDErr,
    Opt,
    Rep,
    TransmissionFlag,
    nbd_error,
)
from fleece.nbd.proto import (
    OUTPUT_LIMIT,
    PAYLOAD_STEP,
    RECV_BUFFER,
    RECV_BUFFER_INITIAL,
    REQUEST_BATCH,
    Disconnect,
    ExportInfo,
    ExportSelected,
    Phase,
    Request,
    ServerConnection,
    StartTLS,
)
from fleece.storage import Storage
from tests.peers import run

pytestmark = pytest.mark.timeout(20)

SIZE = 1 << 20


class Directory:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def find(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def all(self) -> Iterable[ExportInfo]:
        return list(self.exports.values())


RO = ExportInfo("ro", "a read-only disk", SIZE, True, True, (BASE_ALLOCATION, ALLOCATION_DEPTH))
RW = ExportInfo("rw", "", SIZE, False)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def name_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rep, length = struct.unpack(">QIII", data[:20])
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rep, data[20:20 + length]))
        data = data[20 + length:]
    return out


def request(kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length)


def connect(flags: int = 3, *, tls: bool = False) -> ServerConnection:
    conn = ServerConnection(Directory(RO, RW), tls=tls)
    greeting = conn.data_to_send()
    assert struct.unpack(">QQH", greeting) == (NBDMAGIC, IHAVEOPT, 3)
    assert conn.receive_data(struct.pack(">I", flags)) == []
    return conn


def go(conn: ServerConnection, name: str, *, structured: bool = True) -> ExportSelected:
    if structured:
        conn.receive_data(option(Opt.STRUCTURED_REPLY))
        conn.receive_data(option(Opt.SET_META_CONTEXT, meta_data(name, BASE_ALLOCATION)))
    events = conn.receive_data(option(Opt.GO, name_data(name)))
    conn.data_to_send()
    assert len(events) == 1 and isinstance(events[0], ExportSelected)
    return events[0]


def simple_error(data: bytes) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", data)
    assert magic == SIMPLE_REPLY_MAGIC
    return error, cookie


def structured_error(data: bytes) -> tuple[int, int, str]:
    magic, flags, kind, cookie, length, error, mlen = struct.unpack(">IHHQIIH", data[:26])
    assert magic == STRUCTURED_REPLY_MAGIC and flags == 1 and kind == 0x8001
    assert length == 6 + mlen == len(data) - 20
    return error, cookie, data[26:].decode()


# -- negotiation ------------------------------------------------------------------------------
def test_go_reports_export_info_and_block_size() -> None:
    conn = connect()
    events = conn.receive_data(option(Opt.GO, name_data("ro", Info.NAME, Info.DESCRIPTION)))
    got = replies(conn.data_to_send())
    assert [rep for _, rep, _ in got] == [Rep.INFO] * 4 + [Rep.ACK]
    kind, size, flags = struct.unpack(">HQH", got[0][2])
    assert (kind, size) == (Info.EXPORT, SIZE)
    assert flags & TransmissionFlag.READ_ONLY and flags & TransmissionFlag.CAN_MULTI_CONN
    assert got[1][2] == struct.pack(">H", Info.NAME) + b"ro"
    assert got[2][2] == struct.pack(">H", Info.DESCRIPTION) + b"a read-only disk"
    assert struct.unpack(">HIII", got[3][2]) == (Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    assert events == [ExportSelected(RO, False, {})]
    assert conn.phase is Phase.TRANSMISSION


def test_info_stays_in_negotiation_and_unknown_export_is_err_unknown() -> None:
    conn = connect()
    assert conn.receive_data(option(Opt.INFO, name_data("rw"))) == []
    assert replies(conn.data_to_send())[-1][1] == Rep.ACK
    conn.receive_data(option(Opt.GO, name_data("nope")))
    (reply,) = replies(conn.data_to_send())
    assert reply[1] == Rep.ERR_UNKNOWN and b"nope" in reply[2]
    assert conn.phase is Phase.OPTIONS


def test_list_options_and_errors() -> None:
    conn = connect()
    conn.receive_data(option(Opt.LIST))
    got = replies(conn.data_to_send())
    assert [rep for _, rep, _ in got] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    assert got[0][2] == struct.pack(">I", 2) + b"ro" + b"a read-only disk"
    conn.receive_data(option(Opt.LIST, b"x"))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID
    for opt in (Opt.EXTENDED_HEADERS, 99, Opt.PEEK_EXPORT):
        conn.receive_data(option(opt))
        assert replies(conn.data_to_send())[0][1] == Rep.ERR_UNSUP
    conn.receive_data(option(Opt.STARTTLS))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_UNSUP
    conn.receive_data(option(Opt.GO, b"\x00\x00\x00\x09ro"))  # name longer than the data
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID
    conn.receive_data(option(Opt.SET_META_CONTEXT, meta_data("ro", BASE_ALLOCATION)))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID  # structured first
    assert conn.phase is Phase.OPTIONS


def test_meta_contexts_list_and_set() -> None:
    conn = connect()
    conn.receive_data(option(Opt.STRUCTURED_REPLY))
    assert replies(conn.data_to_send()) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    conn.receive_data(option(Opt.LIST_META_CONTEXT, meta_data("ro")))
    listed = replies(conn.data_to_send())
    assert [r[2][4:] for r in listed[:-1]] == [b"base:allocation", b"qemu:allocation-depth"]
    conn.receive_data(option(Opt.LIST_META_CONTEXT, meta_data("ro", "qemu:")))
    assert [r[2][4:] for r in replies(conn.data_to_send())[:-1]] == [b"qemu:allocation-depth"]
    conn.receive_data(
        option(Opt.SET_META_CONTEXT, meta_data("ro", ALLOCATION_DEPTH, "qemu:dirty-bitmap:b"))
    )
    got = replies(conn.data_to_send())
    assert got == [
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 2) + b"qemu:allocation-depth"),
        (Opt.SET_META_CONTEXT, Rep.ACK, b""),
    ]
    (event,) = conn.receive_data(option(Opt.GO, name_data("ro")))
    assert isinstance(event, ExportSelected)
    assert event.structured and event.contexts == {2: ALLOCATION_DEPTH}


def test_contexts_for_another_export_are_dropped() -> None:
    conn = connect()
    conn.receive_data(option(Opt.STRUCTURED_REPLY))
    conn.receive_data(option(Opt.SET_META_CONTEXT, meta_data("ro", BASE_ALLOCATION)))
    (event,) = conn.receive_data(option(Opt.GO, name_data("rw")))
    assert isinstance(event, ExportSelected) and event.contexts == {}


def test_export_name_with_and_without_zeroes() -> None:
    for flags, tail in ((3, 0), (1, 124), (0, 124)):
        conn = connect(flags)
        events = conn.receive_data(option(Opt.EXPORT_NAME, b"rw"))
        data = conn.data_to_send()
        assert len(data) == 10 + tail
        size, tflags = struct.unpack(">QH", data[:10])
        assert size == SIZE and not tflags & TransmissionFlag.READ_ONLY
        assert events == [ExportSelected(RW, False, {})]
    conn = connect()
    (event,) = conn.receive_data(option(Opt.EXPORT_NAME, b"missing"))
    assert isinstance(event, Disconnect) and event.error


def test_abort_acks_then_disconnects() -> None:
    conn = connect()
    (event,) = conn.receive_data(option(Opt.ABORT))
    assert replies(conn.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert event == Disconnect("the client aborted the negotiation", error=False)


@pytest.mark.parametrize(
    "data",
    [
        b"GET ",  # garbage client flags (unknown bits)
        struct.pack(">I", 3) + b"\x00" * 16,  # bad option magic
        struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO, 64 * 1024 + 1),  # too long
    ],
)
def test_bad_handshake_disconnects(data: bytes) -> None:
    conn = ServerConnection(Directory(RO))
    conn.data_to_send()
    events = conn.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], Disconnect) and events[0].error
    assert conn.phase is Phase.CLOSED
    assert conn.receive_data(b"more") == []


def test_options_may_arrive_byte_by_byte() -> None:
    conn = ServerConnection(Directory(RO))
    conn.data_to_send()
    stream = struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, name_data("ro"))
    events = []
    for byte in stream:
        events += conn.receive_data(bytes([byte]))
    assert events == [ExportSelected(RO, True, {})]


def test_tls_required_before_anything_else() -> None:
    conn = connect(tls=True)
    conn.receive_data(option(Opt.GO, name_data("ro")))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_TLS_REQD
    conn.receive_data(option(Opt.LIST))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_TLS_REQD
    (event,) = conn.receive_data(option(Opt.STARTTLS))
    assert isinstance(event, StartTLS)
    assert replies(conn.data_to_send()) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert conn.phase is Phase.TLS_HANDSHAKE
    conn.tls_started()
    conn.receive_data(option(Opt.STARTTLS))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID
    assert isinstance(conn.receive_data(option(Opt.GO, name_data("ro")))[0], ExportSelected)


def test_export_name_before_tls_disconnects() -> None:
    conn = connect(tls=True)
    (event,) = conn.receive_data(option(Opt.EXPORT_NAME, b"ro"))
    assert isinstance(event, Disconnect)


# -- transmission -----------------------------------------------------------------------------
def test_requests_parse_and_pipeline() -> None:
    conn = connect()
    go(conn, "rw")
    stream = (
        request(Cmd.READ, 0, 512, cookie=1)
        + request(Cmd.WRITE, 4096, 5, flags=CmdFlag.FUA, cookie=2) + b"hello"
        + request(Cmd.FLUSH, cookie=3)
        + request(Cmd.BLOCK_STATUS, 0, SIZE, flags=CmdFlag.REQ_ONE, cookie=4)
    )
    events = conn.receive_data(stream)
    assert events == [
        Request(1, Cmd.READ, CmdFlag(0), 0, 512),
        Request(2, Cmd.WRITE, CmdFlag.FUA, 4096, 5, bytearray(b"hello")),
        Request(3, Cmd.FLUSH, CmdFlag(0), 0, 0),
        Request(4, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE),
    ]
    assert conn.data_to_send() == b""


def test_write_payload_is_reported_only_when_complete() -> None:
    conn = connect()
    go(conn, "rw")
    payload = os.urandom(100_000)
    assert conn.receive_data(request(Cmd.WRITE, 0, len(payload)) + payload[:1000]) == []
    with conn.get_buffer() as buf:  # the rest goes straight into the payload, as it arrives
        assert 0 < len(buf) <= len(payload) - 1000
        got = len(buf)
        buf[:] = payload[1000:1000 + got]
    assert conn.buffer_updated(got) == []
    events = conn.receive_data(payload[1000 + got:] + request(Cmd.FLUSH, cookie=9))
    assert [type(e) for e in events] == [Request, Request]
    first = events[0]
    assert isinstance(first, Request) and first.payload == bytearray(payload)


def test_write_payload_memory_follows_what_arrived() -> None:
    """A WRITE header announcing 1 MiB costs nothing up front: the payload's buffer is at most
    twice what arrived (and one step), never the announced length until it all arrived."""
    conn = connect()
    go(conn, "rw")
    assert conn.receive_data(request(Cmd.WRITE, 0, SIZE)) == []
    assert conn._payload is not None and len(conn._payload) == 0
    arrived = 0
    for _ in range(4):
        with conn.get_buffer() as buf:
            assert len(conn._payload) <= 2 * arrived + PAYLOAD_STEP
            buf[:] = b"\xab" * len(buf)
            count = len(buf)
        arrived += count
        assert conn.buffer_updated(count) == []
    assert arrived < SIZE and len(conn._payload) == arrived
    events = conn.receive_data(b"\xab" * (SIZE - arrived))
    assert len(events) == 1 and isinstance(events[0], Request)
    assert events[0].payload == bytearray(b"\xab" * SIZE)


def test_refused_write_is_answered_at_once_and_its_payload_dropped() -> None:
    """A WRITE on a read-only export gets EPERM before its payload arrives; the payload is
    read and discarded (nothing is buffered for it), and the requests after it parse."""
    conn = connect()
    go(conn, "ro", structured=False)
    assert conn.receive_data(request(Cmd.WRITE, 0, 1 << 20, cookie=5)) == []
    error, cookie = simple_error(conn.data_to_send())
    assert (error, cookie) == (NBDErr.EPERM, 5)
    assert conn._payload is None
    for _ in range(16):
        assert conn.receive_data(os.urandom(64 * 1024)) == []
        assert conn._payload is None and len(conn._buf) <= RECV_BUFFER
    assert conn.receive_data(request(Cmd.READ, 0, 512, cookie=6)) == [
        Request(6, Cmd.READ, CmdFlag(0), 0, 512)
    ]


def test_receive_buffer_starts_small_and_grows_on_demand() -> None:
    conn = ServerConnection(Directory(RO, RW))
    assert len(conn._buf) == RECV_BUFFER_INITIAL
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3))
    # An option bigger than the buffer: the buffer grows to hold it (through buffer_updated).
    data = name_data("ro") + b"x" * 20_000
    wire = option(Opt.INFO, data)
    events = []
    while wire:
        with conn.get_buffer() as buf:
            count = min(len(buf), len(wire))
            buf[:count] = wire[:count]
        wire = wire[count:]
        events += conn.buffer_updated(count)
    assert events == [] and RECV_BUFFER_INITIAL < len(conn._buf) <= RECV_BUFFER
    assert replies(conn.data_to_send())[-1][1] == Rep.ERR_INVALID
    # A client that fills every read: the buffer doubles up to RECV_BUFFER, never past it.
    go(conn, "ro")
    headers = request(Cmd.READ, 0, 512) * (RECV_BUFFER // 28 * 2)
    sizes = []
    while headers:
        with conn.get_buffer() as buf:
            count = min(len(buf), len(headers))
            buf[:count] = headers[:count]
            sizes.append(len(buf))
        headers = headers[count:]
        conn.buffer_updated(count)
    assert max(len(conn._buf), *sizes) <= RECV_BUFFER and len(conn._buf) > RECV_BUFFER_INITIAL


def test_queued_replies_hold_back_input_until_drained() -> None:
    """Options or invalid requests sent without reading the replies: interpreting stops once
    OUTPUT_LIMIT bytes of replies are queued, and goes on after they were drained."""
    many = Directory(*[ExportInfo(f"e{i}", "d" * 1000, SIZE, True) for i in range(50)])
    conn = ServerConnection(many)
    conn.data_to_send()
    wire = struct.pack(">I", 3) + option(Opt.LIST) * 200
    with conn.get_buffer() as buf:
        buf[:len(wire)] = wire
    assert conn.buffer_updated(len(wire)) == []
    assert conn.output_blocked
    out = bytearray()
    rounds = 0
    while True:
        chunk = conn.data_to_send()
        assert len(chunk) <= OUTPUT_LIMIT + 50 * 1100  # past the limit: one option's replies
        out += chunk
        if not conn.output_blocked:
            break
        assert conn.resume() == []
        rounds += 1
    assert rounds >= 10
    got = replies(bytes(out))
    assert sum(1 for _, rep, _ in got if rep == Rep.ACK) == 200
    assert sum(1 for _, rep, _ in got if rep == Rep.SERVER) == 200 * 50
    # Invalid requests in transmission: the same bound on their error replies.
    conn = connect()
    go(conn, "ro")
    wire = request(Cmd.READ, SIZE, 512) * 5000
    events: list[object] = []
    sent = 0
    while sent < len(wire) or conn.output_blocked:
        if conn.output_blocked:
            assert len(conn.data_to_send()) <= OUTPUT_LIMIT + REQUEST_BATCH * 200
            events += conn.resume()
            continue
        with conn.get_buffer() as buf:
            count = min(len(buf), len(wire) - sent)
            buf[:count] = wire[sent:sent + count]
        sent += count
        events += conn.buffer_updated(count)
    assert events == [] and len(conn.data_to_send()) <= OUTPUT_LIMIT + REQUEST_BATCH * 200


def test_errors_for_invalid_requests_keep_the_connection() -> None:
    conn = connect(1)
    go(conn, "ro", structured=False)
    cases = [
        (request(Cmd.WRITE, 0, 4, cookie=1) + b"abcd", NBDErr.EPERM),
        (request(Cmd.TRIM, 0, 4096, cookie=2), NBDErr.EPERM),
        (request(Cmd.WRITE_ZEROES, 0, 4096, cookie=3), NBDErr.EPERM),
        (request(Cmd.READ, SIZE - 1, 2, cookie=4), NBDErr.EINVAL),
        (request(Cmd.READ, 0, 33 << 20, cookie=5), NBDErr.EINVAL),
        (request(Cmd.READ, 0, 1, flags=0x100, cookie=6), NBDErr.EINVAL),
        (request(Cmd.READ, 0, 1, flags=CmdFlag.DF, cookie=7), NBDErr.EINVAL),
        (request(42, cookie=8), NBDErr.EINVAL),
        (request(Cmd.BLOCK_STATUS, 0, 1, cookie=9), NBDErr.EINVAL),  # no context
        (request(Cmd.CACHE, SIZE, 1, cookie=10), NBDErr.EINVAL),
    ]
    for data, error in cases:
        assert conn.receive_data(data) == []
        got_error, cookie = simple_error(conn.data_to_send())
        assert got_error == error, cookie
    assert conn.receive_data(request(Cmd.READ, 0, 1, cookie=11)) == [
        Request(11, Cmd.READ, CmdFlag(0), 0, 1)
    ]


def test_write_past_the_end_is_enospc_with_structured_message() -> None:
    conn = connect()
    go(conn, "rw")
    assert conn.receive_data(request(Cmd.WRITE, SIZE - 2, 4, cookie=5) + b"wxyz") == []
    error, cookie, message = structured_error(conn.data_to_send())
    assert (error, cookie) == (NBDErr.ENOSPC, 5) and "end" in message


@pytest.mark.parametrize(("command", "expected"), [(Cmd.WRITE_ZEROES, NBDErr.ENOSPC),
                                                   (Cmd.TRIM, NBDErr.EINVAL)])
def test_zero_and_trim_past_the_end_errors_are_the_specs(command: Cmd,
                                                         expected: NBDErr) -> None:
    conn = connect()
    go(conn, "rw")
    assert conn.receive_data(request(command, SIZE - 2, 4, cookie=6)) == []
    error, cookie, message = structured_error(conn.data_to_send())
    assert (error, cookie) == (expected, 6) and "end" in message


def test_bad_request_magic_and_huge_write_disconnect() -> None:
    conn = connect()
    go(conn, "rw")
    good = request(Cmd.FLUSH, cookie=1)
    events = conn.receive_data(good + b"\xde\xad\xbe\xef" + good[4:])
    assert isinstance(events[0], Request) and isinstance(events[1], Disconnect)
    conn = connect()
    go(conn, "rw")
    (event,) = conn.receive_data(request(Cmd.WRITE, 0, (32 << 20) + 1))
    assert isinstance(event, Disconnect)


def test_disc_ends_the_stream() -> None:
    conn = connect()
    go(conn, "ro")
    events = conn.receive_data(request(Cmd.DISC) + request(Cmd.READ, 0, 1))
    assert events == [Disconnect("the client disconnected", error=False)]


def test_reply_builders() -> None:
    conn = connect()
    go(conn, "ro")
    header, data = conn.read_reply(3, 4096, b"abc")
    assert struct.unpack(">IHHQIQ", header) == (STRUCTURED_REPLY_MAGIC, 1, 1, 3, 11, 4096)
    assert data == b"abc"
    parts = conn.sparse_read_reply(4, [(0, 512, None), (512, 3, b"xyz")])
    assert struct.unpack(">IHHQIQI", parts[0]) == (STRUCTURED_REPLY_MAGIC, 0, 2, 4, 12, 0, 512)
    assert struct.unpack(">IHHQIQ", parts[1])[1] == 1  # DONE on the last chunk
    status = conn.block_status_reply(5, [(1, [(512, 3), (100, 0)])])
    assert struct.unpack(">IHHQII", status[:24]) == (STRUCTURED_REPLY_MAGIC, 1, 5, 5, 20, 1)
    assert conn.ok_reply(6) == struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 0, 6, 0)


def test_errno_mapping() -> None:
    assert nbd_error(errno.EROFS) is NBDErr.EPERM
    assert nbd_error(errno.EDQUOT) is NBDErr.ENOSPC
    assert nbd_error(errno.ENODEV) is NBDErr.EIO
    assert nbd_error(None) is NBDErr.EIO


# -- the client against the server, in process -------------------------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Storage, str]]:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * 4096 + bytes(SIZE - 4096 * 256))
    storage = Storage()
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    sock = str(tmp_path / "nbd.sock")
    storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    storage.execute("nbd-server-add", {"device": "disk", "writable": True})
    storage.execute("nbd-server-add", {"device": "disk", "name": "ro"})
    try:
        yield storage, sock
    finally:
        storage.close()


def test_client_reads_writes_and_block_status(served: tuple[Storage, str]) -> None:
    _, sock = served
    with NBDClient.connect_unix(sock, "disk") as client:
        assert client.size == SIZE and client.structured
        assert client.pread(0, 512) == bytes(range(256)) * 2
        client.pwrite(SIZE - 4096, b"\x5a" * 4096, CmdFlag.FUA)
        assert client.pread(SIZE - 4096, 4096) == b"\x5a" * 4096
        client.flush()
        client.zero(0, 65536)
        assert client.pread(0, 65536) == bytes(65536)
        extents = client.block_status(0, SIZE)
        assert sum(length for length, _ in extents) <= SIZE and extents
        with pytest.raises(NBDError) as info:
            client.pread(SIZE, 1)
        assert info.value.errno == errno.EINVAL
        assert client.pread(4096, 1) == b"\x00"  # still serving


def test_a_fua_write_is_made_durable_by_itself_where_the_node_can(
    served: tuple[Storage, str], tmp_path: Path, file_syscalls: list[tuple[str, int]]
) -> None:
    """FUA asks for that write alone on stable storage (libnbd's ``nbdsh`` sends it):
    ``raw`` over a file writes it with ``RWF_DSYNC`` (the file's other dirty pages stay);
    ``blkdebug`` cannot, so it writes, then flushes the file."""
    storage, sock = served
    (tmp_path / "debug.img").write_bytes(bytes(SIZE))
    storage.execute("blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": {
        "driver": "file", "filename": str(tmp_path / "debug.img")}})
    storage.execute("nbd-server-add", {"device": "dbg", "name": "debug", "writable": True})
    debug_file = storage.graph.get("dbg").child("image")
    assert debug_file is not None
    debug_fd = debug_file.driver.fd  # type: ignore[attr-defined]

    def fua_write(export: str, offset: int, byte: int) -> bytes:
        """A FUA write of 4 KiB by nbdsh, and what the export reads there after it."""
        script = (f"h.pwrite(bytes([{byte}]) * 4096, {offset}, nbd.CMD_FLAG_FUA)\n"
                  f"print(h.pread(4096, {offset}).hex())")
        out = run("nbdsh", "-u", f"nbd+unix:///{export}?socket={sock}", "-c", script).stdout
        return bytes.fromhex(out.strip())

    calls = file_syscalls
    calls.clear()
    assert fua_write("disk", 4096, 0x5A) == b"\x5a" * 4096
    assert calls == [("pwritev", os.RWF_DSYNC)]
    calls.clear()
    assert fua_write("debug", 8192, 0xA5) == b"\xa5" * 4096
    assert calls == [("pwritev", 0), ("fdatasync", debug_fd)]


def test_client_read_only_export_is_eperm(served: tuple[Storage, str]) -> None:
    _, sock = served
    with NBDClient.connect_unix(sock, "ro") as client:
        assert client.flags & TransmissionFlag.READ_ONLY
        with pytest.raises(NBDError) as info:
            client.pwrite(0, b"x")
        assert info.value.errno == errno.EPERM


def test_client_pipelines_many_requests(served: tuple[Storage, str]) -> None:
    _, sock = served
    with NBDClient.connect_unix(sock, "disk") as client:
        cookies = [client.submit(Cmd.READ, i * 4096, 4096) for i in range(64)]
        for i, cookie in reversed(list(enumerate(cookies))):
            data = client.wait(cookie).data
            assert data == (bytes(range(256)) * 16 if i < 256 else bytes(4096))


def test_export_commands(served: tuple[Storage, str]) -> None:
    storage, sock = served
    events: list[str] = []
    storage.subscribe(lambda e: events.append(e["data"]["id"]) if e["event"] ==
                      "BLOCK_EXPORT_DELETED" else None)
    exports = storage.execute("query-block-exports")
    assert {e["id"] for e in exports} == {"disk", "ro"}
    with pytest.raises(Exception, match="already running"):
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    with pytest.raises(Exception, match="already has export named 'ro'"):
        storage.execute("nbd-server-add", {"device": "disk", "name": "ro"})
    with pytest.raises(Exception, match="Bitmap 'b0' is not found"):
        storage.execute("nbd-server-add", {"device": "disk", "name": "x", "bitmap": "b0"})
    client = NBDClient.connect_unix(sock, "ro")
    with pytest.raises(Exception, match="still in use"):
        storage.execute("nbd-server-remove", {"name": "ro"})
    storage.execute("nbd-server-remove", {"name": "ro", "mode": "hard"})
    with pytest.raises(ConnectionError):
        client.pread(0, 1)
    client.close()
    with pytest.raises(Exception, match="Export 'ro' is not found"):
        storage.execute("block-export-del", {"id": "ro"})
    storage.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk",
                                         "name": "other", "allocation-depth": True})
    storage.execute("block-export-del", {"id": "e1"})
    assert events == ["ro", "e1"]
    storage.execute("nbd-server-stop")
    assert events == ["ro", "e1", "disk"]
    with pytest.raises(Exception, match="NBD server not running"):
        storage.execute("nbd-server-stop")
    assert storage.execute("query-block-exports") == []


def test_tcp_port_zero_and_max_connections(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(65536))
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "d",
                                         "file": {"driver": "file", "filename": str(image)}})
        storage.execute("nbd-server-start", {
            "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
            "max-connections": 1,
        })
        storage.execute("nbd-server-add", {"device": "d"})
        server = storage.nbd_server
        assert server is not None
        (address,) = server.addresses
        assert isinstance(address, tuple) and address[1] > 0
        first = NBDClient.connect_tcp(address[0], address[1], "d")
        with pytest.raises(ConnectionError):
            NBDClient.connect_tcp(address[0], address[1], "d")
        first.close()
        done = threading.Event()
        for _ in range(100):  # the slot frees once the server has seen the close
            try:
                NBDClient.connect_tcp(address[0], address[1], "d").close()
                done.set()
                break
            except ConnectionError:
                threading.Event().wait(0.02)
        assert done.is_set()
