"""Group commit: concurrent requests that each need a short write under the same lock share
one transaction, run by one thread.

An upload's transaction runs under its workspace's lock (and on SQLite under the database's
one write lock), so uploads to a workspace commit one after the other however many threads
serve them. Each request used to take a thread of its own from the event loop's pool (up to
40) to wait for its turn: every batch woke them all, and those threads and the event loop
fought over the GIL, which on two cores cost more than the writes themselves. Here a request
stays on the event loop and awaits a future; one thread of the committer's own takes every
request queued so far, runs them as one batch (one transaction, one lock, one commit) and
settles each request's future with its own result, in one call back into each event loop per
batch. Requests that arrive meanwhile queue for the next batch. Alone, a request is a batch
of one and pays one hand-off to the thread, as it would to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Slot(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    loop: asyncio.AbstractEventLoop


class GroupCommit(Generic[In, Out]):
    """Runs `run_batch` on the items of concurrent `submit` calls, batched, in a thread of its
    own (started on first use, a daemon). `run_batch` gets the items in arrival order and
    returns, for each, its result or the exception to raise to its caller (one item refused
    leaves the others alone); an exception it raises itself (the transaction failed) is raised
    to every caller of the batch. A caller that stops waiting (its request was cancelled) does
    not take its item out of a batch already running."""

    def __init__(self, run_batch: Callable[[Sequence[In]], Sequence[Out | BaseException]],
                 *, name: str = "group-commit") -> None:
        self._run_batch = run_batch
        self._name = name
        self._changed = threading.Condition()
        self._queued: list[_Slot[In, Out]] = []
        self._thread: threading.Thread | None = None

    async def submit(self, item: In) -> Out:
        """`item`'s result, once a batch holding it ran."""
        loop = asyncio.get_running_loop()
        slot: _Slot[In, Out] = _Slot(item, loop.create_future(), loop)
        with self._changed:
            self._queued.append(slot)
            if self._thread is None or not self._thread.is_alive():  # (also after a fork)
                self._thread = threading.Thread(target=self._serve, name=self._name,
                                                daemon=True)
                self._thread.start()
            self._changed.notify()
        return await slot.future

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._queued:
                    self._changed.wait()
                batch, self._queued = self._queued, []
            self._run(batch)

    def _run(self, batch: list[_Slot[In, Out]]) -> None:
        try:
            results = self._run_batch([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 (raised to every caller of the batch)
            results = [exc] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Slot[In, Out], object]]] = {}
        for slot, result in zip(batch, results, strict=True):
            by_loop.setdefault(slot.loop, []).append((slot, result))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                log.warning("%d results of %s dropped: their event loop is closed",
                            len(settled), self._name)


def _settle(settled: list[tuple[_Slot[In, Out], object]]) -> None:
    for slot, result in settled:
        if slot.future.done():  # cancelled while its batch ran
            continue
        if isinstance(result, BaseException):
            slot.future.set_exception(result)
        else:
            slot.future.set_result(result)  # type: ignore[arg-type]
