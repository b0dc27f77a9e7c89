"""Every real peer the interop tests use is installed and runs."""

from __future__ import annotations

import pytest

from tests.interop.conftest import PEERS, run


@pytest.mark.parametrize("tool", PEERS)
def test_peer_runs(tool: str) -> None:
    args = ("nbdsh", "-c", "print(h.get_version())") if tool == "nbdsh" else (tool, "--version")
    proc = run(*args)
    assert proc.stdout.strip() or proc.stderr.strip()


def test_qemu_qmp_library_imports() -> None:
    from qemu.qmp import QMPClient

    assert QMPClient.__name__ == "QMPClient"
