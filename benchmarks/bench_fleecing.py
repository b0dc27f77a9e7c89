"""What image fleecing costs the guest, and what the compiled copy-before-write planner buys.

Run with ``make bench`` or ``.venv/bin/python -m pytest benchmarks/bench_fleecing.py
--benchmark-only --benchmark-group-by=group`` (about 30 s in all).

Group ``guest-write-64k``: one round is 256 sequential 64 KiB guest writes (16 MiB) through the
device ``virtio0`` onto a 256 MiB qcow2 source that was fully written beforehand (so no write
allocates a cluster of the source).

- ``without-fleecing``: no job; the writes go straight to the source.
- ``with-fleecing``: a ``drive-backup sync=none`` to a fresh qcow2 target (``pit0``, its backing
  the source) is running, with its defaults (copy-ahead 2 MiB, write-behind 4 MiB). Every
  round starts a new backup in its ``setup`` (outside the timed function), so every cluster
  the round writes is not yet copied. This is the worst case, the first touch of every
  cluster: the first write of each 2 MiB reads the old 2 MiB, reserves new target clusters and
  hands their write to the write-behind thread, then writes; the other 31 find their clusters
  copied.

How to read it: ``ratio = mean(without-fleecing) / mean(with-fleecing)`` is the fraction of its
normal write throughput the guest keeps while a snapshot is fresh. Target: ``ratio >= 0.5``
(copy-before-write at most doubles the cost of a first write; later writes to a copied cluster
cost nothing extra). The ``extra_info`` of each result has ``MiB/s`` per round.

Group ``cbw-plan``: ``plan_runs`` over a 16 Mi-cluster bitmap (1 TiB of 64 KiB clusters) with a
fragmented pattern (alternating set and clear runs of 1 to 2000 clusters, about 16 000 runs of
each), cut into runs of at most 64 clusters (4 MiB, the largest copy I/O of
:mod:`fleece.block.cbw`), as the copy-before-write hook and the backup job plan their copies.
Parametrized by implementation: ``fast`` (:mod:`fleece._fast.cbw`, Cython) and ``pure``
(:mod:`fleece._pure.cbw`); ``fast`` is absent when ``FLEECE_NO_EXTENSIONS`` is set.

How to read it: ``speedup = mean(pure) / mean(fast)``. Target: ``speedup >= 10``. Both build the
same list of about 135 000 tuples, which bounds the speedup from above; the scan itself is what
the compiled twin makes cheap.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fleece._impl import extensions_disabled
from fleece.block.cbw import MAX_COPY_BYTES
from fleece.block.device import Device
from fleece.block.qcow2 import create
from fleece.storage import Storage

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB

SOURCE_SIZE = 256 * MiB
ROUND_BYTES = 16 * MiB
WRITE_ROUNDS = 12

PLAN_CLUSTERS = 16 << 20
PLAN_MAX_RUN = MAX_COPY_BYTES // CLUSTER


# --------------------------------------------------------------------------------------------
# guest-write-64k
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    tmp: Path
    storage: Storage
    device: Device


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A 256 MiB qcow2 source, every cluster written, plugged as ``virtio0``."""
    tmp = tmp_path_factory.mktemp("bench-fleecing")
    path = str(tmp / "src.qcow2")
    create(path, SOURCE_SIZE)
    storage = Storage()
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                     "file": {"driver": "file", "filename": path}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    device = storage.device("virtio0")
    chunk = np.random.default_rng(0).integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes()
    for offset in range(0, SOURCE_SIZE, len(chunk)):
        device.pwrite(offset, chunk)
    device.flush()
    yield Source(tmp, storage, device)
    storage.close()


def _stop_job(storage: Storage, job_id: str) -> None:
    """Cancel ``job_id`` if it runs and wait until it is gone (its target closes with it)."""
    if job_id not in storage.jobs:
        return
    storage.execute("block-job-cancel", {"device": job_id})
    deadline = time.monotonic() + 10
    while job_id in storage.jobs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not end within 10 s of its cancel")
        time.sleep(0.001)


@pytest.mark.benchmark(group="guest-write-64k")
@pytest.mark.parametrize("fleecing", [False, True], ids=["without-fleecing", "with-fleecing"])
def test_guest_write_64k(benchmark: BenchmarkFixture, source: Source, fleecing: bool) -> None:
    payload = bytes([0xAB]) * CLUSTER
    rounds = iter(range(10**6))

    def setup() -> tuple[tuple[int], dict[str, Any]]:
        n = next(rounds)
        if fleecing:
            _stop_job(source.storage, "fleece")
            source.storage.execute("drive-backup", {
                "device": "virtio0", "job-id": "fleece", "sync": "none", "format": "qcow2",
                "target": str(source.tmp / f"pit-{n}.qcow2"), "target-id": "pit0",
                "target-temporary": True,
            })
        base = (n * ROUND_BYTES) % SOURCE_SIZE
        return (base,), {}

    def write_round(base: int) -> None:
        pwrite = source.device.pwrite
        for offset in range(base, base + ROUND_BYTES, CLUSTER):
            pwrite(offset, payload)

    pedantic = cast(Callable[..., Any], benchmark.pedantic)  # pytest-benchmark is untyped
    try:
        pedantic(write_round, setup=setup, rounds=WRITE_ROUNDS, iterations=1,
                           warmup_rounds=1)
    finally:
        _stop_job(source.storage, "fleece")
    stats = benchmark.stats
    if stats is not None:
        benchmark.extra_info["MiB/s"] = round(ROUND_BYTES / MiB / stats.stats.mean, 1)
    assert not [p for p in os.listdir(source.tmp) if p.startswith("pit-")]


# --------------------------------------------------------------------------------------------
# cbw-plan
# --------------------------------------------------------------------------------------------

IMPLS = ["pure"] if extensions_disabled() else ["fast", "pure"]


def _fragmented_bits() -> bytes:
    """The bitmap bytes: alternating set and clear runs of 1..2000 clusters (seeded)."""
    rng = np.random.default_rng(1)
    bits = np.zeros(PLAN_CLUSTERS, dtype=bool)
    position, value = 0, True
    while position < PLAN_CLUSTERS:
        length = int(rng.integers(1, 2001))
        bits[position:position + length] = value
        position += length
        value = not value
    return bytes(np.packbits(bits, bitorder="little").tobytes())


@pytest.fixture(scope="module")
def fragmented_bits() -> bytes:
    return _fragmented_bits()


@pytest.mark.benchmark(group="cbw-plan")
@pytest.mark.parametrize("impl", IMPLS)
def test_plan_runs_16m_clusters(benchmark: BenchmarkFixture, fragmented_bits: bytes,
                                impl: str) -> None:
    bitmap_module = importlib.import_module(f"fleece._{impl}.bitmap")
    cbw_module = importlib.import_module(f"fleece._{impl}.cbw")
    done = bitmap_module.ClusterBitmap.from_bytes(fragmented_bits, PLAN_CLUSTERS)
    plan: Callable[..., list[tuple[int, int]]] = cbw_module.plan_runs
    pedantic = cast(Callable[..., list[tuple[int, int]]], benchmark.pedantic)
    runs = pedantic(plan, args=(done, 0, PLAN_CLUSTERS, PLAN_MAX_RUN),
                              rounds=5 if impl == "pure" else 20, iterations=1,
                              warmup_rounds=1)
    assert 100_000 < len(runs) < 200_000
    assert sum(count for _, count in runs) == PLAN_CLUSTERS - done.count()
    benchmark.extra_info["runs"] = len(runs)
