"""Fuzzing drills: hostile bytes and arguments get clean errors, never a crash or a hang.

- **NBD parser** (:class:`fleece.nbd.proto.ServerConnection`, sans-I/O): valid handshakes and
  request streams (options, structured replies, meta contexts, GO/EXPORT_NAME, READ, WRITE with
  payloads, BLOCK_STATUS, TRIM, DISC), mutated (bytes flipped, inserted, deleted, length fields
  overwritten, truncated) or replaced by random bytes, fed in random chunks. Only typed events
  come out; the receive buffer keeps its fixed size, a buffered WRITE payload never exceeds
  ``MAX_PAYLOAD``, queued replies stay small; the TLS variant is fed too.
- **QMP** (:class:`fleece.qmp.framing.Splitter`, ``parse_request``, ``Storage.execute``):
  random JSON and non-JSON in random chunks; every real command with random arguments (well
  typed, mistyped, unknown keys) on a fresh Storage: only ``QMPError`` subclasses come out.
- **qcow2**: a small valid image (made by ``fleece.block.qcow2.create`` and written by
  fleece) with its header, L1, L2 and refcount bytes mutated: opening raises ``GenericError``
  (``ImageError``) or works, and then reads (and a write, when opened read-write) work or raise
  ``OSError``.
- **End to end**: garbage on a live daemon's NBD and QMP sockets never puts a traceback on the
  wire; the daemon stays up and serves a real client afterwards.

``--long-drills`` multiplies the examples (see ``docs/reliability.md``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleece.block.qcow2 import create
from fleece.errors import GenericError, QMPError
from fleece.nbd.client import NBDClient
from fleece.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    Opt,
)
from fleece.nbd.proto import (
    RECV_BUFFER,
    Disconnect,
    ExportInfo,
    ExportSelected,
    Phase,
    Request,
    ServerConnection,
    StartTLS,
)
from fleece.qmp.framing import BadRequest, Message, ParseError, Splitter, parse_request
from fleece.qmp.framing import Request as QMPRequest
from fleece.storage import Storage
from tests.drills.support import KiB, MiB, RawQMP, fleece_daemon, scale

pytestmark = pytest.mark.timeout(scale(150, 3600))

NBD_EXAMPLES = scale(1000, 20000)
QMP_EXAMPLES = scale(300, 10000)
EXEC_EXAMPLES = scale(200, 5000)
QCOW2_EXAMPLES = scale(400, 5000)
GARBAGE_ROUNDS = scale(60, 1000)

def fuzz(examples: int) -> settings:
    """Hypothesis settings for a drill: ``examples`` examples, no deadline (the pytest timeout
    bounds the run), no example database (the drills are reproducible from their seed)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
        database=None,
    )


# ------------------------------------------------------------------------------------------------
# NBD: the sans-I/O parser
# ------------------------------------------------------------------------------------------------
class Directory:
    """Two exports: a writable ``disk`` and a read-only ``pit0``."""

    exports = (
        ExportInfo("disk", "the guest disk", 1 * MiB, read_only=False),
        ExportInfo("pit0", "snapshot", 1 * MiB, read_only=True, multi_conn=True),
    )

    def find(self, name: str) -> ExportInfo | None:
        return next((e for e in self.exports if e.name == name), None)

    def all(self) -> Iterable[ExportInfo]:
        return self.exports


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def name_field(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


def request(cmd: int, offset: int, length: int, cookie: int, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


@st.composite
def valid_stream(draw: st.DrawFn) -> bytes:
    """A well-formed client stream: flags, some options, an export, some requests."""
    out = bytearray(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    name = draw(st.sampled_from([b"disk", b"pit0", b"", b"nope"]))
    if draw(st.booleans()):
        out += option(Opt.STRUCTURED_REPLY)
        if draw(st.booleans()):
            queries = [BASE_ALLOCATION.encode(), b"qemu:", b"base:"]
            out += option(Opt.SET_META_CONTEXT, name_field(name) + struct.pack(">I", 3)
                          + b"".join(name_field(q) for q in queries))
    for extra in draw(st.lists(st.sampled_from([Opt.LIST, Opt.INFO, Opt.STARTTLS, 99]),
                               max_size=3)):
        if extra == Opt.INFO:
            out += option(extra, name_field(name) + struct.pack(">HH", 1, 3))
        else:
            out += option(extra)
    if draw(st.booleans()):
        out += option(Opt.GO, name_field(name) + struct.pack(">HHH", 2, 0, 3))
    else:
        out += option(Opt.EXPORT_NAME, name)
    kinds = draw(st.lists(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.BLOCK_STATUS, Cmd.FLUSH,
                                           Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.DISC]),
                          max_size=8))
    for cookie, kind in enumerate(kinds, start=1):
        offset = draw(st.integers(0, 1 * MiB))
        length = draw(st.integers(0, 64 * KiB))
        if kind == Cmd.WRITE:
            out += request(kind, offset, length, cookie, payload=bytes(length))
        else:
            out += request(kind, offset, length, cookie)
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with a few byte-level mutations (flip, insert, delete, u32 overwrite, cut)."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "u32", "u64", "cut"]))
        at = draw(st.integers(0, max(0, len(data))))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(max_size=32))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "u32":
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x10000, 0x10001, 0x7FFFFFFF,
                                          0xFFFFFFFF, MAX_PAYLOAD, MAX_PAYLOAD + 1]))
            data[at:at + 4] = struct.pack(">I", value)
        elif kind == "u64":
            data[at:at + 8] = struct.pack(">Q", draw(st.integers(0, 2**64 - 1)))
        elif kind == "cut":
            del data[at:]
    return bytes(data)


def chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` split at the positions ``cuts`` (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        yield data[start:end]


EVENT_TYPES = (ExportSelected, StartTLS, Request, Disconnect)


def drive(conn: ServerConnection, data: bytes, cuts: list[int]) -> list[object]:
    """Feed ``data`` in chunks, answering ``StartTLS`` as the server would; checks bounds."""
    events: list[object] = []
    conn.data_to_send()  # the greeting
    for piece in chunks(data, cuts):
        new = conn.receive_data(piece)
        for event in new:
            assert isinstance(event, EVENT_TYPES), event
            if isinstance(event, StartTLS):
                conn.data_to_send()
                conn.tls_started()
            if isinstance(event, Request):
                assert event.offset >= 0 and event.length >= 0
                assert event.offset + event.length <= 1 * MiB or event.command in (
                    Cmd.FLUSH, Cmd.DISC)
                if event.payload is not None:
                    assert len(event.payload) == event.length <= MAX_PAYLOAD
        events += new
        # Bounded: the receive buffer grows to RECV_BUFFER at most, a pending payload is at
        # most MAX_PAYLOAD, the replies a chunk queues are small (drained after every chunk).
        assert len(conn._buf) <= RECV_BUFFER
        assert 0 <= conn._start <= conn._end <= len(conn._buf)
        assert conn._payload is None or len(conn._payload) <= MAX_PAYLOAD
        queued = conn.data_to_send()
        assert len(queued) <= 64 * KiB + (len(piece) // 16 + 1) * 4200, len(queued)
    if any(isinstance(e, Disconnect) for e in events):
        assert conn.phase is Phase.CLOSED
        assert isinstance(events[-1], Disconnect) or conn.phase is Phase.CLOSED
    return events


STREAMS = st.one_of(
    valid_stream(),
    mutated(valid_stream()),
    st.binary(max_size=512),
    st.binary(max_size=64).map(lambda b: struct.pack(">I", 3) + b),
    mutated(st.binary(max_size=64).map(lambda b: struct.pack(">I", 3) + option(Opt.GO, b))),
)


@fuzz(NBD_EXAMPLES)
@given(data=STREAMS, cuts=st.lists(st.integers(0, 1 << 16), max_size=12), tls=st.booleans())
def test_nbd_parser_survives_mutated_streams(data: bytes, cuts: list[int], tls: bool) -> None:
    conn = ServerConnection(Directory(), tls=tls)
    drive(conn, data, cuts)
    # Whatever came before, more bytes are either parsed or dropped, never an exception.
    conn.receive_data(os.urandom(64))
    assert len(conn._buf) <= RECV_BUFFER


@fuzz(scale(100, 3000))
@given(data=valid_stream(), cuts=st.lists(st.integers(0, 1 << 16), max_size=12))
def test_nbd_parser_same_events_for_any_split(data: bytes, cuts: list[int]) -> None:
    """How a valid stream is cut into chunks does not change what it means."""
    whole = drive(ServerConnection(Directory()), data, [])
    split = drive(ServerConnection(Directory()), data, cuts)
    assert whole == split


def test_nbd_parser_long_option_and_huge_write_are_refused() -> None:
    """An option longer than the 64 KiB limit and a WRITE above MAX_PAYLOAD disconnect
    before anything is buffered for them."""
    conn = ServerConnection(Directory())
    events = conn.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO,
                                                                   0xFFFFFFFF))
    assert isinstance(events[-1], Disconnect) and conn.phase is Phase.CLOSED
    conn = ServerConnection(Directory())
    events = conn.receive_data(struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"disk")
                               + request(Cmd.WRITE, 0, 0xFFFFFFFF, 1))
    assert isinstance(events[-1], Disconnect) and conn._payload is None


# ------------------------------------------------------------------------------------------------
# QMP: framing, request parsing, argument validation
# ------------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)


@st.composite
def qmp_bytes(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["json", "command", "binary", "text", "mutated"]))
        if kind == "json":
            parts.append(json.dumps(draw(JSON)).encode())
        elif kind == "command":
            parts.append(json.dumps({"execute": draw(st.text(max_size=12)),
                                     "arguments": draw(JSON), "id": draw(JSON)}).encode())
        elif kind == "binary":
            parts.append(draw(st.binary(max_size=64)))
        elif kind == "text":
            parts.append(draw(st.text(alphabet='{}[]":,\\ \nabc01', max_size=64)).encode())
        else:
            raw = bytearray(json.dumps({"execute": "query-block", "id": 1}).encode())
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(raw) - 1))
                raw[at] = draw(st.sampled_from(b'{}[]"\\\x00\xff a'))
            parts.append(bytes(raw))
        parts.append(draw(st.sampled_from([b"", b" ", b"\r\n"])))
    return b"".join(parts)


@fuzz(QMP_EXAMPLES)
@given(data=qmp_bytes(), cuts=st.lists(st.integers(0, 1 << 12), max_size=8))
def test_qmp_framing_survives_anything(data: bytes, cuts: list[int]) -> None:
    splitter = Splitter()
    for piece in chunks(data, cuts):
        for event in splitter.feed(piece):
            assert isinstance(event, Message | ParseError), event
            if isinstance(event, Message):
                parsed = parse_request(event.value)
                assert isinstance(parsed, QMPRequest | BadRequest)
            else:
                assert event.desc.startswith("JSON parse error, ") or event.desc in (
                    "JSON token size limit exceeded", "JSON token count limit exceeded",
                    "JSON nesting depth limit exceeded")
    assert splitter.pending <= len(data) + 1


def test_qmp_framing_bounds_a_huge_message() -> None:
    """A message over the 16 MiB limit is dropped with one error; the next one parses."""
    splitter = Splitter()
    events = splitter.feed(b'{"execute": "' + b"x" * (17 * MiB) + b'"}')
    assert events == [ParseError("JSON token size limit exceeded")]
    assert splitter.pending < 1 * MiB
    assert splitter.feed(b'{"execute": "query-block"}') == [
        Message({"execute": "query-block"})]


NODE_NAMES = st.sampled_from(["disk0", "virtio0", "pit0", "nope", "", "#x", "a" * 5000])


def value_for(kind: object) -> st.SearchStrategy[Any]:
    """A value of the schema type ``kind`` (an enum is a tuple of strings)."""
    if isinstance(kind, tuple):
        return st.sampled_from(kind)
    return {
        "str": NODE_NAMES | st.text(max_size=12),
        "int": st.integers(-(2**64), 2**64),
        "bool": st.booleans(),
        "number": st.floats(allow_nan=False),
        "object": st.dictionaries(st.text(max_size=8), JSON, max_size=4),
        "array": st.lists(JSON, max_size=3),
    }.get(str(kind), JSON)


PATH_KEYS = {"target", "filename", "path", "dir", "file"}


@st.composite
def command_and_arguments(draw: st.DrawFn, storage: Storage) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(storage.commands()))
    schema = storage.schema(name)
    arguments: dict[str, Any] = {}
    if schema is not None:
        for key, kind in schema.items():
            plain = key.lstrip("*")
            if key.startswith("*") and draw(st.booleans()):
                continue
            if draw(st.integers(0, 9)) == 0:
                continue  # a required one goes missing
            arguments[plain] = draw(value_for(kind) if draw(st.integers(0, 4)) else JSON)
    else:
        arguments = draw(st.dictionaries(
            st.sampled_from(["driver", "node-name", "qom-type", "id", "read-only", "image",
                             "inject-error", "backing", "cache", "discard"]) | st.text(max_size=6),
            st.sampled_from(["qcow2", "raw", "file", "null-co", "blkdebug", "tls-creds-x509",
                             "copy-before-write", "snapshot-access"]) | JSON, max_size=5))
    if draw(st.integers(0, 5)) == 0:
        arguments[draw(st.text(max_size=8))] = draw(JSON)
    # Paths stay inside the example's folder (a fuzzer must not write anywhere else).
    for key in list(arguments):
        if key in PATH_KEYS:
            arguments[key] = draw(st.sampled_from(["t.qcow2", "t.raw", "src.qcow2", "s.sock"]))
    return name, arguments


class Scratch:
    """A fresh Storage per example, in its own folder (the working directory meanwhile)."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="fleece-fuzz-")
        self.old = os.getcwd()
        os.chdir(self.dir.name)
        create("src.qcow2", 4 * MiB)
        self.storage = Storage()
        self.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                              "file": {"driver": "file",
                                                       "filename": "src.qcow2"}})
        self.storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                            "drive": "disk0"})

    def close(self) -> None:
        try:
            self.storage.close()
        finally:
            os.chdir(self.old)
            self.dir.cleanup()


_COMMANDS = Storage().commands()


@fuzz(EXEC_EXAMPLES)
@given(data=st.data())
def test_storage_execute_raises_only_qmp_errors(data: st.DataObject) -> None:
    scratch = Scratch()
    try:
        for _ in range(data.draw(st.integers(1, 3))):
            name, arguments = data.draw(command_and_arguments(scratch.storage))
            try:
                scratch.storage.execute(name, arguments)
            except QMPError as exc:
                assert exc.desc, (name, arguments)
            except Exception as exc:  # the bug this drill hunts
                pytest.fail(f"{name} {arguments!r} raised {type(exc).__name__}: {exc}")
    finally:
        scratch.close()


def test_every_command_was_reachable() -> None:
    assert len(_COMMANDS) > 20


# ------------------------------------------------------------------------------------------------
# qcow2: hostile images
# ------------------------------------------------------------------------------------------------
QCOW2_SIZE = 2 * MiB
QCOW2_CLUSTER = 4096


@pytest.fixture(scope="module")
def qcow2_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, range]]:
    """A small valid image with data in several places, and where its metadata lies."""
    path = str(tmp_path_factory.mktemp("qcow2") / "base.qcow2")
    create(path, QCOW2_SIZE, cluster_size=QCOW2_CLUSTER)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "n",
                                         "file": {"driver": "file", "filename": path}})
        node = storage.graph.get("n")
        for i, offset in enumerate((0, 5000, 600 * KiB, QCOW2_SIZE - QCOW2_CLUSTER)):
            node.pwrite(offset, bytes([i + 1]) * 6000 if offset + 6000 <= QCOW2_SIZE
                        else bytes([i + 1]) * QCOW2_CLUSTER)
        node.flush()
    image = Path(path).read_bytes()
    l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack_from(">IQQI", image, 36)
    regions = {
        "header": range(0, 112),
        "l1": range(l1_offset, l1_offset + 8 * l1_size),
        "reftable": range(rt_offset, rt_offset + 8 * max(1, min(rt_clusters, 4)) * 8),
    }
    (l2,) = struct.unpack_from(">Q", image, l1_offset)
    l2 &= 0x00FFFFFFFFFFFE00
    if l2:
        regions["l2"] = range(l2, l2 + QCOW2_CLUSTER)
    (rb,) = struct.unpack_from(">Q", image, rt_offset)
    if rb:
        regions["refblock"] = range(rb, rb + 256)
    return image, regions


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF]
INTERESTING_U64 = [0, 1, 2**63, 2**64 - 1, 2**62, 4096, 2**31, 2**32 - 1, 1 << 40,
                   0x8000000000010000, 0x4000000000000000]


@fuzz(QCOW2_EXAMPLES)
@given(data=st.data(), writable=st.booleans())
def test_qcow2_mutated_images_are_refused_or_read(
    qcow2_image: tuple[bytes, dict[str, range]], tmp_path: Path, data: st.DataObject,
    writable: bool,
) -> None:
    image, regions = qcow2_image
    raw = bytearray(image)
    for _ in range(data.draw(st.integers(1, 4))):
        region = regions[data.draw(st.sampled_from(sorted(regions)))]
        at = data.draw(st.integers(region.start, region.stop - 1))
        if data.draw(st.booleans()):
            raw[at] = data.draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        else:
            at -= at % 8 if data.draw(st.booleans()) else 0
            raw[at:at + 8] = struct.pack(">Q", data.draw(st.sampled_from(INTERESTING_U64)
                                                          | st.integers(0, 2**64 - 1)))
    path = tmp_path / "m.qcow2"
    path.write_bytes(bytes(raw))
    storage = Storage()
    try:
        try:
            storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "m",
                                             "read-only": not writable,
                                             "file": {"driver": "file", "filename": str(path)}})
        except GenericError:
            return  # refused: fine (ImageError is a GenericError)
        node = storage.graph.get("m")
        size = node.size
        spans = [(0, min(size, QCOW2_SIZE))]
        if size > QCOW2_SIZE:
            spans += [(size - QCOW2_CLUSTER, QCOW2_CLUSTER), (size // 2, 3 * QCOW2_CLUSTER)]
        for start, length in spans:
            for offset in range(start, start + length, 256 * KiB):
                with contextlib.suppress(OSError):
                    node.pread(offset, min(256 * KiB, start + length - offset))
        if writable and size >= 3 * QCOW2_CLUSTER:
            with contextlib.suppress(OSError):
                node.pwrite(QCOW2_CLUSTER, b"\xaa" * (2 * QCOW2_CLUSTER))
            with contextlib.suppress(OSError):
                node.pread(0, 3 * QCOW2_CLUSTER)
    finally:
        with contextlib.suppress(OSError):
            storage.close()


# ------------------------------------------------------------------------------------------------
# End to end: garbage on a live daemon's sockets
# ------------------------------------------------------------------------------------------------
def recv_all(sock: socket.socket, timeout: float) -> bytes:
    """What the peer sends until it closes or stays quiet for ``timeout`` seconds."""
    sock.settimeout(timeout)
    out = bytearray()
    with contextlib.suppress(OSError):
        while len(out) < 1 * MiB:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    return bytes(out)


def garbage(rng: random.Random, valid: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 2048))
    data = bytearray(valid)
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(len(data))
        data[at] = rng.randrange(256)
    if kind == 2:
        data += rng.randbytes(rng.randrange(0, 256))
    if kind == 3:
        del data[rng.randrange(len(data)):]
    return bytes(data)


@pytest.mark.timeout(scale(90, 1800))
def test_garbage_on_live_sockets(tmp_path: Path) -> None:
    image = tmp_path / "src.qcow2"
    create(str(image), 4 * MiB)
    qmp, nbd = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    daemon = fleece_daemon(qmp, [
        "--drive", f"id=virtio0,file={image},format=qcow2",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=e0,node-name=drive-virtio0,name=disk0",
    ], tmp_path)
    rng = random.Random(9)
    valid_nbd = (struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY)
                 + option(Opt.GO, name_field(b"disk0") + struct.pack(">H", 0))
                 + request(Cmd.READ, 0, 4096, 1) + request(Cmd.BLOCK_STATUS, 0, 4096, 2))
    valid_qmp = (b'{"execute": "qmp_capabilities"}{"execute": "query-named-block-nodes", '
                 b'"id": 7}{"execute": "query-block-jobs", "arguments": {}}')
    try:
        daemon.wait_socket()
        replies = 0
        for _ in range(GARBAGE_ROUNDS):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(nbd))
                with contextlib.suppress(OSError):
                    sock.sendall(garbage(rng, valid_nbd))
                wire = recv_all(sock, 0.2)
                assert b"Traceback" not in wire and b'File "' not in wire, wire[:400]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(qmp))
                with contextlib.suppress(OSError):
                    sock.sendall(garbage(rng, valid_qmp))
                wire = recv_all(sock, 0.2)
                assert b"Traceback" not in wire and b'File "' not in wire, wire[:400]
                for line in wire.splitlines():
                    message = json.loads(line)  # every reply is clean JSON
                    assert set(message) & {"QMP", "return", "error", "event"}, message
                    if "error" in message:
                        assert "internal error" not in message["error"]["desc"], message
                        replies += 1
            assert daemon.alive(), daemon.stderr
        assert replies > 0
        # Still serving: a real client reads, the monitor answers.
        with NBDClient.connect_unix(str(nbd), "disk0") as client:
            assert client.pread(0, 4096) == bytes(4096)
        monitor = RawQMP(qmp)
        monitor.negotiate()
        assert monitor.ok("query-block")[0]["device"] == "virtio0"
        monitor.close()
        time.sleep(0.1)
        assert "Traceback" not in daemon.stderr, daemon.stderr[-3000:]
    finally:
        daemon.stop()
