"""api.group_commit: concurrent submissions share batches, each gets its own result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from api.group_commit import GroupCommit


def test_alone_a_submission_is_a_batch_of_one() -> None:
    batches: list[list[int]] = []
    threads: set[str] = set()

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        threads.add(threading.current_thread().name)
        return [i * 10 for i in items]

    commit = GroupCommit(run, name="committer")

    async def main() -> list[int]:
        return [await commit.submit(1), await commit.submit(2)]

    assert asyncio.run(main()) == [10, 20]
    assert batches == [[1], [2]]
    assert threads == {"committer"}  # never the event loop's thread


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

    async def main() -> tuple[int, list[int]]:
        first = asyncio.create_task(commit.submit(0))
        assert await asyncio.to_thread(first_running.wait, 5)
        rest = [asyncio.create_task(commit.submit(i)) for i in range(1, 8)]
        while len(commit._queued) < 7:  # every one of them waits for the running batch
            await asyncio.sleep(0.01)
        release.set()
        return await first, list(await asyncio.gather(*rest))

    assert asyncio.run(main()) == (0, [i * 10 for i in range(1, 8)])
    assert batches == [[0], list(range(1, 8))]


def test_an_item_refused_alone_and_a_failed_batch_fails_all() -> None:
    def run(items: Sequence[int]) -> list[int | Exception]:
        if 99 in items:
            raise RuntimeError("transaction failed")
        return [ValueError(f"no {i}") if i < 0 else i for i in items]

    commit = GroupCommit(run)

    async def main() -> None:
        assert await commit.submit(3) == 3
        with pytest.raises(ValueError, match="no -1"):
            await commit.submit(-1)
        with pytest.raises(RuntimeError, match="transaction failed"):
            await commit.submit(99)
        assert await commit.submit(4) == 4  # a failed batch leaves the committer serving

    asyncio.run(main())


def test_results_reach_each_callers_own_event_loop() -> None:
    """Two event loops (the API's and a test client's, or two threads') share a committer."""
    release = threading.Event()

    def run(items: Sequence[int]) -> list[int]:
        release.wait(5)
        return [i + 1 for i in items]

    commit = GroupCommit(run)
    results: dict[int, int] = {}

    def caller(i: int) -> None:
        results[i] = asyncio.run(commit.submit(i))

    threads = [threading.Thread(target=caller, args=(i,)) for i in (10, 20)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(5)
    assert results == {10: 11, 20: 21}


def test_a_cancelled_caller_leaves_the_batch_and_the_others_alone() -> None:
    running, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def run(items: Sequence[int]) -> list[int]:
        running.set()
        release.wait(5)
        ran.extend(items)
        return list(items)

    commit = GroupCommit(run)

    async def main() -> int:
        doomed = asyncio.create_task(commit.submit(1))
        assert await asyncio.to_thread(running.wait, 5)
        doomed.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await commit.submit(2)

    assert asyncio.run(main()) == 2
    assert ran == [1, 2]  # the cancelled item's batch still ran: its upload is recorded
