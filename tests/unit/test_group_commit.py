"""api.group_commit: concurrent submissions share batches, each gets its own result."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.group_commit import GroupCommit


def test_alone_a_submission_is_a_batch_of_one() -> None:
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return [i * 10 for i in items]

    commit = GroupCommit(run)
    assert [commit.submit(1), commit.submit(2)] == [10, 20]
    assert batches == [[1], [2]]


def test_submissions_that_arrive_while_a_batch_runs_share_the_next() -> None:
    first_running, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if items == [0]:
            first_running.set()
            release.wait(5)
        return [i * 10 for i in items]

    commit = GroupCommit(run)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(commit.submit, 0)
        assert first_running.wait(5)
        rest = [pool.submit(commit.submit, i) for i in range(1, 8)]
        while len(commit._queued) < 7:  # every one of them waits for the running batch
            time.sleep(0.01)
        release.set()
        assert first.result(5) == 0
        assert [f.result(5) for f in rest] == [i * 10 for i in range(1, 8)]
    assert batches[0] == [0] and sorted(batches[1]) == list(range(1, 8))


def test_an_item_refused_alone_and_a_failed_batch_fails_all() -> None:
    def run(items: Sequence[int]) -> list[int | Exception]:
        if 99 in items:
            raise RuntimeError("transaction failed")
        return [ValueError(f"no {i}") if i < 0 else i for i in items]

    commit = GroupCommit(run)
    assert commit.submit(3) == 3
    with pytest.raises(ValueError, match="no -1"):
        commit.submit(-1)
    with pytest.raises(RuntimeError, match="transaction failed"):
        commit.submit(99)
    assert commit.submit(4) == 4  # a failed batch leaves no leader behind
