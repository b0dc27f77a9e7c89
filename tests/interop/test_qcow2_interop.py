"""qcow2 interop with the real QEMU tools (``qemu-img``, ``qemu-io``; missing tools fail).

Images QEMU wrote must read through fleece exactly as ``qemu-img convert -O raw`` reads them;
images fleece wrote must pass ``qemu-img check`` (exit 0: no corruption, no leaks) and convert
to the bytes of a model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleece.block.graph import BlockGraph
from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm
from fleece.block.qcow2 import create
from fleece.errors import ImageError
from tests.peers import run

pytestmark = pytest.mark.interop

RW = (Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = run(*args, str(path))
    assert "error" not in result.stdout.lower() + result.stderr.lower(), result


def qemu_check(path: Path) -> None:
    result = run("qemu-img", "check", str(path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".converted.raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


class Image:
    def __init__(self, path: Path, *, read_only: bool = False, **extra: Any) -> None:
        self.graph = BlockGraph()
        options: dict[str, Any] = {
            "driver": "qcow2",
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(path)},
            **extra,
        }
        if read_only:
            options["read-only"] = True
        self.node: BlockNode = self.graph.open_node(options)
        perm, shared = (Perm.CONSISTENT_READ, Perm.all()) if read_only else RW
        self.user: NodeUser = self.node.add_user(UserKind.MONITOR, "the test", perm, shared)

    def __enter__(self) -> BlockNode:
        return self.node

    def __exit__(self, *exc: object) -> None:
        self.user.release()


def read_all(node: BlockNode, chunk: int = 1 << 20) -> bytes:
    out = bytearray(node.size)
    for off in range(0, node.size, chunk):
        n = min(chunk, node.size - off)
        node.pread_into(off, memoryview(out)[off : off + n])
    return bytes(out)


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- images QEMU wrote ------------------------------------------------------------------------
def _raw_base(tmp: Path, size: int, seed: int) -> Path:
    base = tmp / "base.raw"
    base.write_bytes(noise(size, seed))
    return base


QEMU_CASES = [
    # (name, cluster size, compat, size, backing)
    ("v3-64k-raw-backing", 65536, "1.1", 4 * 1024 * 1024 + 7 * 512, "raw"),
    ("v3-512-qcow2-backing", 512, "1.1", 1024 * 1024 + 512, "qcow2"),
    ("v2-4k-raw-backing", 4096, "0.10", 3 * 1024 * 1024 + 1024, "raw"),
    ("v2-2m-none", 2 * 1024 * 1024, "0.10", 9 * 1024 * 1024 + 512, None),
    ("v3-2m-qcow2-backing", 2 * 1024 * 1024, "1.1", 10 * 1024 * 1024 + 1536, "qcow2"),
    ("v3-64k-none", 65536, "1.1", 2 * 1024 * 1024 + 4608, None),
]


@pytest.mark.parametrize(
    ("name", "cluster_size", "compat", "size", "backing"),
    QEMU_CASES,
    ids=[c[0] for c in QEMU_CASES],
)
def test_qemu_written_images_read_identically(
    tmp_path: Path, name: str, cluster_size: int, compat: str, size: int, backing: str | None
) -> None:
    sub = tmp_path / "imgs"
    sub.mkdir()
    opts = f"cluster_size={cluster_size},compat={compat}"
    if backing == "raw":
        _raw_base(sub, size // 2 + 512, 1)  # shorter than the overlay
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw",
            str(sub / "top.qcow2"), str(size))
    elif backing == "qcow2":
        run("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
            str(sub / "base.qcow2"), str(size))
        qemu_io(sub / "base.qcow2", "write -P 0x11 0 1M", f"write -P 0x22 {size - 4096} 4096")
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
            str(sub / "top.qcow2"), str(size))
    else:
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, str(sub / "top.qcow2"), str(size))
    top = sub / "top.qcow2"
    zero_cmd = "write -z" if compat == "1.1" else "write -P 0"
    qemu_io(
        top,
        "write -P 0xaa 1000 70000",
        f"write -P 0xbb {size - 3000} 3000",
        f"{zero_cmd} 4096 8192",
        f"{zero_cmd} {cluster_size * 2} {cluster_size}",
        f"discard {cluster_size * 3} {cluster_size}",
        "write -P 0xcc 200000 300",
    )
    if compat == "1.1":
        qemu_io(top, f"write -z -u {cluster_size} {cluster_size}")
    expected = qemu_raw(top, tmp_path)
    with Image(top, read_only=True) as node:
        assert node.size == size
        assert read_all(node) == expected
        assert read_all(node, chunk=65536 + 512) == expected
    # and through a writable open (which must leave the image clean)
    with Image(top) as node:
        assert read_all(node) == expected
    qemu_check(top)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_qemu_compressed_images(tmp_path: Path, cluster_size: int) -> None:
    size = 2 * 1024 * 1024
    src = tmp_path / "src.raw"
    data = bytearray(noise(size, 2))
    for off in range(0, size, 8192):  # half compressible, half not
        data[off : off + 4096] = b"fleece! " * 512
    data[size // 2 : size // 2 + 300000] = bytes(300000)
    src.write_bytes(bytes(data))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}",
        str(src), str(img))
    with Image(img, read_only=True) as node:
        assert read_all(node) == bytes(data)
        assert read_all(node, chunk=3000) == bytes(data)
    # overwrite some compressed clusters (partially and whole): refcounts must stay exact
    with Image(img) as node:
        node.pwrite(10, b"X" * 100)
        data[10:110] = b"X" * 100
        node.pwrite(cluster_size * 7, b"Y" * cluster_size * 3)
        data[cluster_size * 7 : cluster_size * 10] = b"Y" * cluster_size * 3
        node.pwrite_zeroes(cluster_size * 20, cluster_size * 4, may_unmap=True)
        data[cluster_size * 20 : cluster_size * 24] = bytes(cluster_size * 4)
        node.pdiscard(cluster_size * 30, cluster_size * 2)
        data[cluster_size * 30 : cluster_size * 32] = bytes(cluster_size * 2)
        assert read_all(node) == bytes(data)
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == bytes(data)


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_qemu_refcount_widths_written_by_fleece(tmp_path: Path, bits: int) -> None:
    img = tmp_path / "r.qcow2"
    size = 8 * 1024 * 1024
    run("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}",
        str(img), str(size))
    qemu_io(img, "write -P 0x33 0 100000")
    model = bytearray(size)
    model[:100000] = b"\x33" * 100000
    with Image(img) as node:
        for i in range(40):
            off = (i * 196613) % (size - 70000)
            chunk = noise(70000, i)
            node.pwrite(off, chunk)
            model[off : off + 70000] = chunk
        node.pdiscard(0, 50000)
        model[0:49664] = bytes(49664)  # whole 512-byte clusters only
        assert read_all(node) == model
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == model


# -- images fleece wrote ----------------------------------------------------------------------
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize(("cluster_size", "backing"), [(512, "raw"), (4096, "qcow2"),
                                                       (65536, "raw"), (2 * 1024 * 1024, None)])
def test_fleece_written_images_pass_qemu_check(
    tmp_path: Path, version: int, cluster_size: int, backing: str | None
) -> None:
    size = 3 * 1024 * 1024 + 512 * 5
    base_data = bytes(size)
    sub = tmp_path / "d"
    sub.mkdir()
    if backing == "raw":
        base_data = noise(size - 8192, 3) + bytes(8192)
        (sub / "base.raw").write_bytes(base_data[: size - 8192])
        create(str(sub / "top.qcow2"), size, cluster_size=cluster_size, backing_file="base.raw",
               backing_format="raw", version=version)
    elif backing == "qcow2":
        run("qemu-img", "create", "-f", "qcow2", str(sub / "base.qcow2"), str(size))
        qemu_io(sub / "base.qcow2", "write -P 0x44 0 2M")
        base_data = b"\x44" * (2 << 20) + bytes(size - (2 << 20))
        create(str(sub / "top.qcow2"), size, cluster_size=cluster_size,
               backing_file="base.qcow2", version=version)
    else:
        create(str(sub / "top.qcow2"), size, cluster_size=cluster_size, version=version)
    top = sub / "top.qcow2"
    info = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    if backing:
        assert info["backing-filename"] == f"base.{backing}"
        assert info["backing-filename-format"] == backing
    assert info["cluster-size"] == cluster_size
    qemu_check(top)
    model = bytearray(base_data)
    rng = random.Random(cluster_size * version)
    with Image(top) as node:
        for i in range(30):
            off = rng.randrange(size - 100000)
            n = rng.randrange(1, 100000)
            op = rng.random()
            if op < 0.6:
                chunk = noise(n, i)
                node.pwrite(off, chunk)
                model[off : off + n] = chunk
            elif op < 0.8:
                node.pwrite_zeroes(off, n, may_unmap=rng.random() < 0.5)
                model[off : off + n] = bytes(n)
            else:
                node.pdiscard(off, n)
                model[off : off + n] = node.pread(off, n)
        node.pwrite(size - 100, b"T" * 100)
        model[size - 100 :] = b"T" * 100
        assert read_all(node) == model
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == model


@pytest.mark.parametrize("cluster_size", [512, 4096])
def test_fleece_growth_many_tables_and_blocks(tmp_path: Path, cluster_size: int) -> None:
    img = tmp_path / "g.qcow2"
    size = 24 * 1024 * 1024
    create(str(img), size, cluster_size=cluster_size)
    model = bytearray(size)
    with Image(img) as node:
        for off in range(0, size, 256 * 1024):
            chunk = noise(256 * 1024, off)
            node.pwrite(off, chunk)
            model[off : off + len(chunk)] = chunk
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == model
    with Image(img) as node:  # rewrite after discards: frees and reuses clusters
        node.pdiscard(size // 4, size // 2)
        model[size // 4 : 3 * size // 4] = bytes(size // 2)
        for off in range(size // 4, 3 * size // 4, 1024 * 1024):
            node.pwrite(off + 512, b"R" * 4096)
            model[off + 512 : off + 4608] = b"R" * 4096
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == model


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_direct_writes_pass_qemu_check(tmp_path: Path, cluster_size: int) -> None:
    """Direct writes (copy-before-write's write-behind): several bulk reservations, one
    write abandoned, normal writes in between. Once closed, no cluster leaks and QEMU reads
    what was written."""
    img = tmp_path / "d.qcow2"
    size = 40 * 1024 * 1024
    create(str(img), size, cluster_size=cluster_size)
    model = bytearray(size)
    with Image(img) as node:
        for n, off in enumerate(range(0, size, 1024 * 1024)):
            direct = node.begin_direct_write(off, 512 * 1024)
            assert direct is not None
            chunk = noise(512 * 1024, off)
            os.pwrite(direct.fd, chunk, direct.host)
            abandon = n == 7
            direct.finish(not abandon)
            if not abandon:
                model[off : off + len(chunk)] = chunk
            if n % 5 == 0:
                node.pwrite(off + 768 * 1024, b"N" * 4096)
                model[off + 768 * 1024 : off + 772 * 1024] = b"N" * 4096
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == model


# -- random sequences against a model ---------------------------------------------------------
SIZE = 512 * 1024 + 3 * 512
OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "zero-unmap", "discard", "flush", "read"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 80000),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, version=st.sampled_from([2, 3]), cluster_size=st.sampled_from([512, 4096, 65536]))
def test_random_operations_against_model(
    ops: list[tuple[str, int, int]], version: int, cluster_size: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = noise(SIZE - 20000, 9)
        (tmp / "base.raw").write_bytes(base)
        model = bytearray(base + bytes(20000))
        top = tmp / "top.qcow2"
        create(str(top), SIZE, cluster_size=cluster_size, backing_file="base.raw",
               version=version)
        with Image(top) as node:
            assert node.size == SIZE
            for i, (op, off, n) in enumerate(ops):
                n = min(n, SIZE - off)
                if op == "write":
                    chunk = noise(n, i)
                    node.pwrite(off, chunk)
                    model[off : off + n] = chunk
                elif op in ("zero", "zero-unmap"):
                    node.pwrite_zeroes(off, n, may_unmap=op == "zero-unmap")
                    model[off : off + n] = bytes(n)
                elif op == "discard":
                    before = bytes(model[off : off + n])
                    node.pdiscard(off, n)
                    after = node.pread(off, n)
                    # a hint: each byte keeps its value or reads zero, never backing data
                    for k in range(-(off % 512), n, 512):
                        lo, hi = max(k, 0), k + 512
                        a, b = after[lo:hi], before[lo:hi]
                        assert a == b or a == bytes(len(a))
                    model[off : off + n] = after
                elif op == "flush":
                    node.flush()
                else:
                    assert node.pread(off, n) == model[off : off + n]
            assert read_all(node) == model
        qemu_check(top)
        assert qemu_raw(top, tmp) == model


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_qemu_preallocated_images(tmp_path: Path, prealloc: str) -> None:
    img = tmp_path / "p.qcow2"
    size = 3 * 1024 * 1024
    run("qemu-img", "create", "-f", "qcow2", "-o", f"preallocation={prealloc},cluster_size=4096",
        str(img), str(size))
    qemu_io(img, "write -P 0x55 5000 10000")
    expected = bytearray(qemu_raw(img, tmp_path))
    with Image(img) as node:
        assert read_all(node) == expected
        node.pwrite(100, b"abc")
        expected[100:103] = b"abc"
        node.pwrite_zeroes(65536, 65536 * 4, may_unmap=False)
        node.pwrite_zeroes(65536 * 8, 65536 * 4, may_unmap=True)
        expected[65536 : 65536 * 5] = bytes(65536 * 4)
        expected[65536 * 8 : 65536 * 12] = bytes(65536 * 4)
        assert read_all(node) == expected
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == expected


def test_qemu_dirty_lazy_refcounts_image(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "4M")
    # qemu-io killed mid-session leaves the dirty bit set (lazy refcounts never written)
    run("qemu-io", "-c", "write -P 0x77 0 64k", "-c", "sigraise 9", str(img), check=False)
    info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(img)).stdout)
    assert info["dirty-flag"] is True
    with Image(img, read_only=True) as node:
        assert node.pread(0, 65536) == b"\x77" * 65536
        assert node.info()["image"]["format-specific"]["data"]["lazy-refcounts"] is True
    with pytest.raises(ImageError, match="dirty"):
        Image(img)


_CRASH_WORKER = """
import random, sys
from fleece.block.graph import BlockGraph
from fleece.block.node import UserKind
from fleece.block.perm import Perm
g = BlockGraph()
n = g.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": sys.argv[1]}})
n.add_user(UserKind.MONITOR, "crash", Perm.CONSISTENT_READ | Perm.WRITE,
           Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
rng = random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    off = rng.randrange(n.size - 70000)
    op = rng.random()
    if op < 0.7:
        n.pwrite(off, rng.randbytes(rng.randrange(1, 70000)))
    elif op < 0.85:
        n.pwrite_zeroes(off, rng.randrange(1, 70000), rng.random() < 0.5)
    else:
        n.pdiscard(off, rng.randrange(1, 70000))
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_leaks_but_never_corrupts(tmp_path: Path, seed: int) -> None:
    (tmp_path / "base.raw").write_bytes(noise(4 << 20, seed))
    img = tmp_path / "k.qcow2"
    create(str(img), 16 << 20, cluster_size=512, backing_file="base.raw")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WORKER, str(img), str(seed)],
        stdout=subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.5 + seed * 0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run("qemu-img", "check", str(img), check=False)
    assert result.returncode in (0, 3), result.stdout + result.stderr  # 3: leaked clusters only
    with Image(img) as node:  # and fleece still opens, reads and writes it
        node.pwrite(0, b"after")
        assert node.pread(0, 5) == b"after"
