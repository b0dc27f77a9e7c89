"""Guest I/O through a ``Storage`` device: 4 KiB random and 64 KiB sequential reads and writes.

Each operation is one pytest-benchmark group (``read-4k-random``, ``write-4k-random``,
``read-64k-seq``, ``write-64k-seq``) and the image format is the parameter: ``raw`` always,
``qcow2`` when fleece's qcow2 driver is present and can create images. Every image is 256 MiB,
made once per format in a temporary folder and completely written before any timing, so reads hit
data (not holes) and qcow2 writes rewrite allocated clusters (no allocation is timed). The timed
function issues exactly one request through ``Device.pread_into`` / ``Device.pwrite``, into a
buffer it owns; the offsets are drawn before timing. The whole module runs in well under a minute.

Run it::

    .venv/bin/python -m pytest benchmarks/bench_device.py

Reading the qcow2-vs-raw ratio (no script needed): pytest-benchmark prints one table per group.
In each column every value is followed by a parenthesised number, its ratio to the best value of
that column in the group (``(1.0)`` marks the best). As raw is normally the faster row, the number
in parentheses on the ``[qcow2]`` row of the ``Median`` (or ``Min``) column, e.g.
``11.92 (1.27)``, is qcow2's time per request as a multiple of raw's: 1.27 means qcow2 takes 27 %
longer. If ``(1.0)`` sits on the qcow2 row instead, qcow2 was the faster one and the raw row shows
raw's multiple of qcow2's. Prefer ``Median`` over ``Mean`` (writes see page-cache writeback
outliers); in the ``OPS`` column the ratio is inverted (0.79 = qcow2 does 79 % of raw's requests
per second).
For a compact view add ``--benchmark-columns=min,median,mean,ops --benchmark-sort=name``;
``--benchmark-json=out.json`` keeps the numbers (``benchmarks[].stats.mean`` per
``benchmarks[].params.fmt``) for a later ``--benchmark-compare``.
"""

from __future__ import annotations

import importlib
import itertools
import os
import random
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fleece.block.device import Device
from fleece.storage import Storage

KiB = 1 << 10
MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
FILL_CHUNK = 4 * MiB
#: offsets drawn per benchmark; cycled if a benchmark runs more requests than this
OFFSETS = 1 << 16
#: per benchmark: stop after this many seconds of rounds (8 benchmarks, < 60 s with setup)
MAX_TIME = 1.0


def _qcow2_create() -> Callable[..., None] | None:
    """fleece's qcow2 ``create(path, size, ...)``, or None while there is no qcow2 driver."""
    for module_name in ("fleece.block.drivers.qcow2", "fleece.block.qcow2.create"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        create = getattr(module, "create", None)
        if callable(create):
            return cast("Callable[..., None]", create)
    return None


QCOW2_CREATE = _qcow2_create()
FORMATS = ["raw", "qcow2"] if QCOW2_CREATE is not None else ["raw"]


def _blockdev_options(fmt: str, path: str) -> dict[str, Any]:
    return {"driver": fmt, "node-name": "disk0", "file": {"driver": "file", "filename": path}}


@pytest.fixture(scope="module", params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def device(fmt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """Device ``virtio0`` on a 256 MiB image of ``fmt``, every byte written before timing."""
    path = str(tmp_path_factory.mktemp("bench") / f"disk.{fmt}")
    chunk = random.Random(1).randbytes(FILL_CHUNK)
    if fmt == "raw":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, IMAGE_SIZE, FILL_CHUNK):
                os.pwrite(fd, chunk, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        assert QCOW2_CREATE is not None
        QCOW2_CREATE(path, IMAGE_SIZE)
    storage = Storage()
    try:
        storage.execute("blockdev-add", _blockdev_options(fmt, path))
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
        dev = storage.device("virtio0")
        if fmt != "raw":  # allocate every cluster now, so no allocation is timed
            for offset in range(0, IMAGE_SIZE, FILL_CHUNK):
                dev.pwrite(offset, chunk)
            dev.flush()
        assert dev.size == IMAGE_SIZE
        yield dev
    finally:
        storage.close()


def random_offsets(block: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    blocks = IMAGE_SIZE // block
    return itertools.cycle([rng.randrange(blocks) * block for _ in range(OFFSETS)])


def sequential_offsets(block: int) -> Iterator[int]:
    return itertools.cycle(range(0, IMAGE_SIZE, block))


@pytest.mark.benchmark(group="read-4k-random", max_time=MAX_TIME)
def test_read_4k_random(benchmark: BenchmarkFixture, device: Device, fmt: str) -> None:
    offsets = random_offsets(4 * KiB, 2)
    buf = bytearray(4 * KiB)
    view = memoryview(buf)
    read = device.pread_into
    benchmark.extra_info["format"] = fmt
    benchmark(lambda: read(next(offsets), view))
    assert any(buf)  # the image is full of data


@pytest.mark.benchmark(group="write-4k-random", max_time=MAX_TIME)
def test_write_4k_random(benchmark: BenchmarkFixture, device: Device, fmt: str) -> None:
    offsets = random_offsets(4 * KiB, 3)
    payload = memoryview(random.Random(4).randbytes(4 * KiB))
    write = device.pwrite
    benchmark.extra_info["format"] = fmt
    benchmark(lambda: write(next(offsets), payload))
    probe = next(offsets)
    write(probe, payload)
    assert device.pread(probe, 4 * KiB) == payload


@pytest.mark.benchmark(group="read-64k-seq", max_time=MAX_TIME)
def test_read_64k_sequential(benchmark: BenchmarkFixture, device: Device, fmt: str) -> None:
    offsets = sequential_offsets(64 * KiB)
    buf = bytearray(64 * KiB)
    view = memoryview(buf)
    read = device.pread_into
    benchmark.extra_info["format"] = fmt
    benchmark(lambda: read(next(offsets), view))
    assert any(buf)


@pytest.mark.benchmark(group="write-64k-seq", max_time=MAX_TIME)
def test_write_64k_sequential(benchmark: BenchmarkFixture, device: Device, fmt: str) -> None:
    offsets = sequential_offsets(64 * KiB)
    payload = memoryview(random.Random(5).randbytes(64 * KiB))
    write = device.pwrite
    benchmark.extra_info["format"] = fmt
    benchmark(lambda: write(next(offsets), payload))
    write(0, payload)
    assert device.pread(0, 64 * KiB) == payload
