"""SQLite's writers take turns across processes (`sluice.db._WriterTurn`): an `flock` beside the
database, re-entrant within a thread, reopened in a forked child."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sluice.db import _WriterTurn


def _write_turns(turn: _WriterTurn, log: Path, tag: str, n: int) -> None:
    for _ in range(n):
        with turn:
            with log.open("a") as f:
                f.write(f"{tag}+\n")
            time.sleep(0.001)  # another writer would come in here without the turn
            with turn:  # a nested transaction in the same thread
                pass
            with log.open("a") as f:
                f.write(f"{tag}-\n")


def _assert_no_overlap(log: Path, tags: set[str], n: int) -> None:
    lines = log.read_text().split()
    assert len(lines) == 2 * n * len(tags)
    for begin, end in zip(lines[::2], lines[1::2], strict=True):
        assert begin.endswith("+") and end == begin[:-1] + "-", (begin, end)
    assert {line[:-1] for line in lines} == tags


def test_processes_forked_after_a_turn_still_take_turns(tmp_path: Path) -> None:
    turn = _WriterTurn()
    turn.use(str(tmp_path / "sluice.db"))
    log = tmp_path / "log"
    with turn:  # the parent's lock file is open before the fork
        pass
    children = []
    for tag in ("a", "b", "c"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                _write_turns(turn, log, tag, 40)
            except BaseException:  # noqa: BLE001 - a forked child must exit here, whatever happened
                code = 1
            os._exit(code)
        children.append(pid)
    _write_turns(turn, log, "p", 40)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    _assert_no_overlap(log, {"a", "b", "c", "p"}, 40)
    assert (tmp_path / "sluice.db.writers").exists()


def test_threads_take_turns_and_a_waiter_enters_when_the_holder_leaves(tmp_path: Path) -> None:
    turn = _WriterTurn()
    turn.use(str(tmp_path / "sluice.db"))
    log = tmp_path / "log"
    threads = [threading.Thread(target=_write_turns, args=(turn, log, tag, 30))
               for tag in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_no_overlap(log, {"x", "y"}, 30)

    entered = threading.Event()

    def waiter() -> None:
        with turn:
            entered.set()

    with turn:
        t = threading.Thread(target=waiter)
        t.start()
        assert not entered.wait(0.2)  # held here
    assert entered.wait(5)
    t.join()


def test_an_in_memory_database_takes_turns_between_threads_only(tmp_path: Path) -> None:
    turn = _WriterTurn()
    turn.use(":memory:")
    with turn, turn:
        pass
    assert list(tmp_path.iterdir()) == []
