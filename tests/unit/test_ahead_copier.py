"""The copier thread of a sequential writer's window (:mod:`fleece.block.ahead_copier`).

Every piece handed over has its lock released exactly once, whatever happens to it: copied,
failed, cancelled by ``close``, dropped because no thread could be started, or left behind by a
bug in the copy. A lock never released would stall every guest write to those clusters.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from fleece.block.ahead_copier import AheadCopier
from fleece.block.copy_ahead import CopyAhead


class Pieces:
    """What the copier did: pieces copied (in order) and releases per piece."""

    def __init__(self) -> None:
        self.copied: list[int] = []
        self.released: Counter[int] = Counter()

    def release(self, first: int) -> Callable[[], None]:
        def done() -> None:
            self.released.update([first])

        return done


def test_pieces_are_copied_in_order_and_each_released_once() -> None:
    log = Pieces()
    copier = AheadCopier(lambda first, end: log.copied.append(first))
    for first in range(0, 40, 8):
        assert copier.submit(first, first + 8, log.release(first))
    copier.idle()
    assert log.copied == [0, 8, 16, 24, 32]
    assert log.released == Counter({0: 1, 8: 1, 16: 1, 24: 1, 32: 1})
    assert not any(t.name == "fleece-cbw-ahead" for t in threading.enumerate())


def test_a_failed_copy_goes_on_with_the_next_piece() -> None:
    log = Pieces()

    def copy(first: int, end: int) -> None:
        if first == 8:
            raise OSError(5, "EIO")
        log.copied.append(first)

    copier = AheadCopier(copy)
    for first in (0, 8, 16):
        copier.submit(first, first + 8, log.release(first))
    copier.idle()
    assert log.copied == [0, 16]
    assert log.released == Counter({0: 1, 8: 1, 16: 1})


def test_a_bug_in_the_copy_lets_every_lock_go() -> None:
    log = Pieces()
    gate = threading.Event()

    def copy(first: int, end: int) -> None:
        assert gate.wait(10)
        raise ValueError("a bug")

    copier = AheadCopier(copy)
    caught: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: caught.append(args.exc_value)
    try:
        for first in (0, 8, 16):
            copier.submit(first, first + 8, log.release(first))
        gate.set()
        copier.idle()
    finally:
        threading.excepthook = old_hook
    assert log.released == Counter({0: 1, 8: 1, 16: 1})
    assert len(caught) == 1 and isinstance(caught[0], ValueError)


def test_close_cancels_what_has_not_started_and_waits_for_the_rest() -> None:
    log = Pieces()
    started, gate = threading.Event(), threading.Event()

    def copy(first: int, end: int) -> None:
        started.set()
        assert gate.wait(10)
        log.copied.append(first)

    copier = AheadCopier(copy)
    for first in (0, 8, 16):
        copier.submit(first, first + 8, log.release(first))
    assert started.wait(10)
    closing = threading.Thread(target=copier.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()
    gate.set()
    closing.join(10)
    assert log.copied == [0]
    assert log.released == Counter({0: 1, 8: 1, 16: 1})
    assert not copier.submit(24, 32, log.release(24))
    assert log.released[24] == 0  # refused: the caller releases it


def test_no_thread_to_be_had_drops_the_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread fails to start after another writer queued a piece, counting on it: that
    piece's lock goes too; the refused one is left to its caller."""
    log = Pieces()
    copier = AheadCopier(lambda first, end: log.copied.append(first))

    def no_thread(self: threading.Thread) -> None:
        assert copier.submit(8, 16, log.release(8))  # meanwhile: expects the thread
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert not copier.submit(0, 8, log.release(0))
    assert log.released == Counter({8: 1}) and log.copied == []
    monkeypatch.undo()
    assert copier.submit(16, 24, log.release(16))
    copier.idle()
    assert log.copied == [16] and log.released == Counter({8: 1, 16: 1})


def test_when_its_pieces_run_out_the_thread_asks_for_more() -> None:
    """``further`` runs in the copier's thread when no piece is left; what it submits is
    copied by the same thread, which stops once it submits nothing more."""
    log = Pieces()
    asked: list[str] = []
    copier: AheadCopier

    def further() -> bool:
        asked.append(threading.current_thread().name)
        if len(asked) > 2:
            return False
        first = 8 * len(asked)
        return copier.submit(first, first + 8, log.release(first))

    copier = AheadCopier(lambda first, end: log.copied.append(first), further)
    assert copier.submit(0, 8, log.release(0))
    copier.idle()
    assert log.copied == [0, 8, 16]
    assert log.released == Counter({0: 1, 8: 1, 16: 1})
    assert asked == ["fleece-cbw-ahead"] * 3


def test_a_closed_copier_asks_for_nothing_more() -> None:
    log = Pieces()
    asked: list[int] = []
    gate = threading.Event()

    def copy(first: int, end: int) -> None:
        assert gate.wait(10)
        log.copied.append(first)

    def further() -> bool:
        asked.append(1)
        return False

    copier = AheadCopier(copy, further)
    assert copier.submit(0, 8, log.release(0))
    closing = threading.Thread(target=copier.close)
    closing.start()
    while not copier._closed:  # closed while the piece is being copied
        time.sleep(0.001)
    gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert log.copied == [0] and asked == []


def test_a_window_goes_on_only_while_its_writer_stays_in_the_stream() -> None:
    """:meth:`CopyAhead.extend` (one byte per cluster here): the clusters after the last
    window, growing as the writer's own windows grow; nothing before a window, after the
    writer left its stream, or past the disk's end."""
    ahead = CopyAhead(4, 40)
    assert ahead.extend() is None  # no window yet
    assert ahead.plan(0, 1, 0, 1) == (0, 1)  # a first write: its own cluster
    assert ahead.plan(1, 1, 1, 2) == (1, 5)  # it goes on: a window of 4
    assert ahead.extend() == (5, 13)
    assert ahead.extend() == (13, 29)
    assert ahead.extend() == (29, 40)  # (32: GROWTH times the first) cut at the end
    assert ahead.extend() is None
    ahead = CopyAhead(4, 40)
    ahead.plan(0, 1, 0, 1)
    ahead.plan(1, 1, 1, 2)
    assert ahead.plan(30, 1, 30, 31) == (30, 31)  # elsewhere: another writer
    assert ahead.extend() is None
