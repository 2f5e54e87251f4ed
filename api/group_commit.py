"""Group commit: concurrent requests that each need a short write under the same lock share
one transaction.

An upload's transaction runs under its workspace's lock (and on SQLite under the database's
one write lock), so uploads to a workspace commit one after the other however many threads
serve them; under load a thread holding the lock also waits for the GIL between statements,
and each transaction took ~6 ms of wall time for ~1 ms of work. Here the first thread to
arrive leads: it takes every request queued so far, runs them as one batch (one transaction,
one lock, one commit) and hands each its own result; requests that arrive meanwhile queue for
the next batch, which one of their threads leads. Alone, a request is a batch of one and pays
nothing extra.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(slots=True)
class _Slot(Generic[In, Out]):
    item: In
    done: bool = False
    result: Out | None = None
    error: BaseException | None = field(default=None, repr=False)


class GroupCommit(Generic[In, Out]):
    """Runs `run_batch` on the items of concurrent `submit` calls, batched. `run_batch` gets
    the items in arrival order and returns, for each, its result or the exception to raise to
    its caller (one item refused leaves the others alone); an exception it raises itself (the
    transaction failed) is raised to every caller of the batch."""

    def __init__(self, run_batch: Callable[[Sequence[In]], Sequence[Out | BaseException]]
                 ) -> None:
        self._run_batch = run_batch
        self._changed = threading.Condition()
        self._queued: list[_Slot[In, Out]] = []
        self._leading = False

    def submit(self, item: In) -> Out:
        """`item`'s result, once a batch holding it ran (blocks the calling thread)."""
        slot: _Slot[In, Out] = _Slot(item)
        with self._changed:
            self._queued.append(slot)
            while self._leading and not slot.done:
                self._changed.wait()
            if not slot.done:  # nobody leads: this thread runs what is queued, its own too
                self._leading = True
                batch, self._queued = self._queued, []
        if not slot.done:
            self._lead(batch)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self, batch: list[_Slot[In, Out]]) -> None:
        try:
            results = self._run_batch([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 (raised to every caller of the batch)
            results = [exc] * len(batch)
        with self._changed:
            for s, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    s.error = result
                else:
                    s.result = result
                s.done = True
            self._leading = False
            self._changed.notify_all()
