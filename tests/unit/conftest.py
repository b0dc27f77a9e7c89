"""Shared fixtures for the unit tests: the cluster bitmap implementations available in this run.

The pure twin (:mod:`fleece._pure.bitmap`) is always tested. The compiled class
(:mod:`fleece._fast.bitmap`) is tested too unless ``FLEECE_NO_EXTENSIONS`` disables it; when it is
wanted but does not import, every test that asks for it fails (it is never skipped), so a broken
build cannot pass as a pure-only run.

Fixtures:

- ``bitmap_impl``: one implementation class per test, parametrized with ids ``pure`` / ``fast``.
- ``bitmap_impls``: the list of every available implementation class, for tests (such as the
  Hypothesis state machine) that drive all of them side by side.
- ``file_syscalls``: the file driver's writes (``("pwritev", flags)``) and every
  ``("fdatasync", fd)``, in order, from the fixture's start to the test's end.

Both classes are typed as the pure class (as :mod:`fleece.bitmap` does): they share one API.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, cast

import pytest

from fleece._impl import extensions_disabled
from fleece.block.drivers.file import FileDriver

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap

#: Implementation names tested in this run, in the order their params appear.
BITMAP_IMPL_NAMES: list[str] = ["pure"] if extensions_disabled() else ["pure", "fast"]


def load_bitmap_impl(name: str) -> type[ClusterBitmap]:
    """Return ``ClusterBitmap`` from ``fleece._<name>.bitmap``.

    Calls :func:`pytest.fail` (never skip) when the module does not import.
    """
    module_name = f"fleece._{name}.bitmap"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(
            f"{module_name} did not import ({exc!r}); build it with `pip install -e .` "
            "or set FLEECE_NO_EXTENSIONS=1 to test the pure twin only",
            pytrace=False,
        )
    return cast("type[ClusterBitmap]", module.ClusterBitmap)


@pytest.fixture(params=BITMAP_IMPL_NAMES)
def bitmap_impl(request: pytest.FixtureRequest) -> type[ClusterBitmap]:
    """One available ``ClusterBitmap`` class per test (ids ``pure`` and ``fast``)."""
    name: str = request.param
    return load_bitmap_impl(name)


@pytest.fixture
def bitmap_impls() -> list[type[ClusterBitmap]]:
    """Every ``ClusterBitmap`` class available in this run, pure first."""
    return [load_bitmap_impl(name) for name in BITMAP_IMPL_NAMES]


@pytest.fixture
def file_syscalls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record the file driver's writes with their flags, and every ``fdatasync`` with its
    descriptor."""
    calls: list[tuple[str, int]] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0, /) -> int:
        calls.append(("pwritev", flags))
        return real_pwritev(fd, buffers, offset, flags)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", fd))
        real_fdatasync(fd)

    monkeypatch.setattr(FileDriver.ops, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls
