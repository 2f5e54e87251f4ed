"""The shell every stage runs in: claim → heartbeat → work → record the outcome → hand off.

The retry policy lives here, once, keyed on the exception type: `PermanentError` fails the job
at once with its code; anything else (connection errors, timeouts, unexpected bugs) is retried
with backoff up to the queue's limit and then dead-lettered with every attempt kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import Job, JobState, documents, fairness, ledger
from models.entities import utcnow
from pipelines.errors import PermanentError, PipelineError
from sluice import metrics
from sluice.db import session_scope, transition_scope
from sluice.logs import bind_context, current_context, current_request_id, reset_context
from sluice.settings import get_settings
from tasks.names import QUEUE_OF_TASK, TASK_OF_STAGE
from tasks.publish import dispatch, publish

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised at a checkpoint when the job was cancelled while running."""


class ClaimLost(Exception):
    """Raised at a checkpoint when another delivery took the job over: stop, touch nothing."""


@dataclass
class Handoff:
    """What to publish after the final transaction commits."""

    stage: str | None = None
    held: bool | None = None
    """Whether the job's workspace had held jobs in its lane when the job ended, read in the
    transaction that ended it (None: not read; the runner's dispatch reads it)."""


@dataclass
class StageContext:
    claim: ledger.Claim
    workspace_id: str
    kind: str
    document_id: str | None
    payload: dict[str, Any]
    _heartbeat: _Heartbeat = field(repr=False)

    def checkpoint(self, progress: float | None = None) -> None:
        """Stop here if the job was cancelled or taken over; record progress."""
        if progress is not None:
            self._heartbeat.progress = progress
        if self._heartbeat.lost.is_set():
            self._heartbeat.raise_why()

    def guard(self, session: Session) -> None:
        """In a transaction that writes part of a stage's results before its end: refresh the
        heartbeat by compare-and-set, and stop (rolling the transaction back) if the job was
        cancelled or taken over since. Two deliveries can never interleave their writes."""
        if ledger.heartbeat(session, self.claim):
            return
        job = session.get(Job, self.claim.job_id)
        if job is not None and job.cancel_requested:
            raise JobCancelled(self.claim.job_id)
        raise ClaimLost(self.claim.job_id)

    def finish(self, persist: Callable[[Session], bool], *, then: str | None = None) -> Handoff:
        """Run `persist` (which writes results and makes the ledger transition) in one short
        transaction; `then` is the stage to publish after commit, the one `persist` moved the
        job to with `ledger.advance` (which marks it published). A job that ends here frees its
        slot: the same transaction reads whether held jobs wait for one, so the runner's
        dispatch needs no transaction of its own when none do (most jobs). (On PostgreSQL a
        job held by an upload that counted this one in flight and commits after this read
        waits for the reconciler's dispatch, as one that commits after any read would.)"""
        with session_scope() as session:
            if not persist(session):
                raise ClaimLost(self.claim.job_id)
            held = None if then is not None else fairness.has_held(
                session, workspace_id=self.workspace_id, lane=fairness.lane_of(self.kind))
        return Handoff(stage=then, held=held)

    def succeed(self, result: dict[str, Any] | None = None) -> Handoff:
        """End the job succeeded with `result`, for a stage with nothing else to write: what
        `finish` with `ledger.succeed` does, through `ledger.succeed_at_once` when the job is
        not a part (on PostgreSQL, one statement)."""
        claim = self.claim
        if not claim.parent_known or claim.parent_id is not None:
            return self.finish(lambda session: ledger.succeed(session, claim, result=result))
        with transition_scope() as conn:
            ok, held = ledger.succeed_at_once(
                conn, claim, result=result, workspace_id=self.workspace_id,
                held=fairness.HAS_HELD[fairness.lane_of(self.kind)])
        if not ok:
            raise ClaimLost(claim.job_id)
        return Handoff(held=held)


class _Heartbeat:
    """The heartbeat of one running job, refreshed by its process's `_HeartbeatThread`
    independently of the work, so a busy job is never mistaken for a dead one."""

    def __init__(self, claim: ledger.Claim, interval_s: float) -> None:
        self.claim = claim
        self.interval_s = interval_s
        self.progress: float | None = None
        self.reported: float | None = None
        self.due = time.monotonic() + interval_s
        self.stop_event = threading.Event()
        self.lost = threading.Event()
        self.log_context = dict(current_context())  # another thread has an empty one

    def start(self) -> None:
        _HeartbeatThread.of_this_process().add(self)

    def stop(self) -> None:
        self.stop_event.set()
        _HeartbeatThread.of_this_process().remove(self)

    def beat(self) -> None:
        """Refresh the heartbeat (with new progress, if any); `lost` when the claim is gone."""
        progress = self.progress if self.progress != self.reported else None
        token = bind_context(**self.log_context)
        try:
            with session_scope() as session:
                held = ledger.heartbeat(session, self.claim, progress=progress)
        except DBAPIError as exc:  # the database is away; keep trying, the work goes on
            log.warning("heartbeat for job %s failed: %s", self.claim.job_id, exc)
            return
        finally:
            reset_context(token)
        if not held:
            self.lost.set()
        elif progress is not None:
            self.reported = progress

    def raise_why(self) -> None:
        with session_scope() as session:
            job = session.get(Job, self.claim.job_id)
            if job is not None and job.cancel_requested:
                raise JobCancelled(self.claim.job_id)
        raise ClaimLost(self.claim.job_id)


class _HeartbeatThread(threading.Thread):
    """One thread per worker process beats for every job running in it, each every
    `interval_s` from its start (a thread started per job cost a few ms of each job's time:
    `Thread.start` waits until the new thread runs). Created on first use in the process, so
    a forked pool child gets its own, never its parent's."""

    _current: _HeartbeatThread | None = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(name="heartbeats", daemon=True)
        self.pid = os.getpid()
        self.beats: set[_Heartbeat] = set()
        self.changed = threading.Condition()

    @classmethod
    def of_this_process(cls) -> _HeartbeatThread:
        current = cls._current
        if current is None or current.pid != os.getpid():
            with cls._create_lock:
                current = cls._current
                if current is None or current.pid != os.getpid():
                    current = cls._current = cls()
                    current.start()
        return current

    def add(self, beat: _Heartbeat) -> None:
        with self.changed:
            self.beats.add(beat)
            self.changed.notify()

    def remove(self, beat: _Heartbeat) -> None:
        with self.changed:
            self.beats.discard(beat)

    def run(self) -> None:
        while True:
            with self.changed:
                now = time.monotonic()
                due = [b for b in self.beats if b.due <= now]
                if not due:
                    nearest = min((b.due for b in self.beats), default=now + 3600)
                    self.changed.wait(nearest - now)
                    continue
            for beat in due:
                if beat.stop_event.is_set():
                    continue
                beat.beat()
                beat.due = time.monotonic() + beat.interval_s
                if beat.lost.is_set():
                    self.remove(beat)


def classify(exc: BaseException) -> tuple[bool, str]:
    """(permanent?, error code) for an exception raised by a stage. A soft time limit is
    recognised even when a pipeline wrapped it in its own error."""
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, SoftTimeLimitExceeded | TimeLimitExceeded):
            return False, "timeout"
        chain = chain.__cause__ or chain.__context__
    if isinstance(exc, PermanentError):
        return True, exc.code
    if isinstance(exc, PipelineError):
        return False, exc.code
    if isinstance(exc, WorkerLostError):
        return False, "worker_lost"
    if isinstance(exc, DBAPIError):
        return False, "database_unavailable"
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return False, "connection_error"
    return False, "unexpected_error"


def queue_of_stage(stage: str) -> str:
    return QUEUE_OF_TASK[TASK_OF_STAGE[stage]]


def fail_attempt(
    claim: ledger.Claim,
    *,
    kind: str,
    workspace_id: str,
    document_id: str | None,
    permanent: bool,
    code: str,
    message: str,
    traceback: str | None = None,
) -> JobState | None:
    """Record a failed attempt: `failed` when permanent, else `retrying` (republished after a
    backoff) while the queue's retries last, then `dead`. A document whose ingest ends here is
    marked failed with the same code, and the job's slot goes to the workspace's next held
    job. None when the claim was no longer held."""
    queue = queue_of_stage(claim.stage)
    policy = get_settings().retry_policy(queue)
    delay = policy.delay_s(claim.attempt)
    with session_scope() as session:
        state: JobState | None
        if permanent:
            ok = ledger.fail(session, claim, code=code, message=message, traceback=traceback)
            state = JobState.FAILED if ok else None
        else:
            state = ledger.retry_or_bury(session, claim, max_retries=policy.max_retries,
                                         delay_s=delay, code=code, message=message,
                                         traceback=traceback)
        if state in (JobState.FAILED, JobState.DEAD) and document_id is not None:
            documents.mark_failed(session, document_id=document_id, code=code, message=message)
    if state is not None:
        metrics.job_outcome(kind=kind, queue=queue, state=state, code=code)
    log.log(
        logging.WARNING if state == JobState.RETRYING else logging.ERROR,
        "job %s: %s attempt %d failed with %s (%s): %s",
        claim.job_id, claim.stage, claim.attempt, code, state, message,
    )
    if state == JobState.RETRYING:
        publish(claim.job_id, claim.stage, countdown=delay)  # it keeps its slot
    elif state is not None:
        dispatch(workspace_id, kind)
    return state


def fail_running_attempt(job_id: str, *, stage: str, code: str, message: str) -> JobState | None:
    """Fail the attempt a job is running now, from outside the process that ran it (its
    worker was killed by a hard time limit, or its heartbeat went stale)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.stage != stage:
            return None
        claim = ledger.Claim(job_id=job.id, stage=job.stage, attempt=job.attempt)
        document_id, kind, workspace_id = job.document_id, job.kind, job.workspace_id
    return fail_attempt(claim, kind=kind, workspace_id=workspace_id, document_id=document_id,
                        permanent=False, code=code, message=message)


def run_stage(
    *,
    job_id: str,
    stage: str,
    work: Callable[[StageContext], Handoff],
    on_cancel: Callable[[Session, StageContext], None] | None = None,
    worker: str | None = None,
) -> str:
    """Run one delivery of `stage` for job `job_id` on `worker` (the Celery node name);
    returns what happened (for logs and tests)."""
    settings = get_settings()
    worker = worker or socket.gethostname()
    with transition_scope() as conn:  # the common case; anything else in a transaction
        claim = ledger.claim_at_once(conn, job_id=job_id, stage=stage, worker=worker)
    if claim is None:
        stale_before = utcnow() - timedelta(seconds=settings.heartbeat_stale_s)
        with session_scope() as session:
            claim = ledger.start(session, job_id=job_id, stage=stage, worker=worker,
                                 stale_before=stale_before)
    job = claim.job if claim else None
    snapshot = (job.workspace_id, job.document_id, dict(job.payload), job.kind) if job else None
    if job is not None:  # the header's request id, or the row's for an older message
        bind_context(document_id=job.document_id, workspace_id=job.workspace_id,
                     request_id=current_request_id() or job.request_id)
    if claim is None or snapshot is None:
        log.info("job %s: %s delivery ignored (not startable: duplicate, late or cancelled)",
                 job_id, stage)
        return "ignored"

    kind, queue = snapshot[3], queue_of_stage(stage)
    metrics.job_started(kind=kind, queue=queue)
    began = time.monotonic()
    heartbeat = _Heartbeat(claim, settings.heartbeat_interval_s)
    ctx = StageContext(claim=claim, workspace_id=snapshot[0], kind=kind,
                       document_id=snapshot[1], payload=snapshot[2], _heartbeat=heartbeat)
    heartbeat.start()
    try:
        handoff = work(ctx)
    except ClaimLost:
        log.warning("job %s: claim on %s attempt %d lost; abandoning", job_id, stage, claim.attempt)
        return "abandoned"
    except JobCancelled:
        with session_scope() as session:
            if on_cancel is not None:
                on_cancel(session, ctx)
            ledger.acknowledge_cancel(session, claim)
        log.info("job %s: cancelled during %s", job_id, stage)
        dispatch(ctx.workspace_id, kind)
        return JobState.CANCELLED
    except (KeyboardInterrupt, SystemExit):
        # The worker is stopping (cold shutdown after the soft-shutdown grace): hand the
        # attempt back so the requeued message runs at once on another worker.
        with session_scope() as session:
            ledger.release(session, claim)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, none swallowed
        permanent, code = classify(exc)
        state = fail_attempt(claim, kind=kind, workspace_id=ctx.workspace_id,
                             document_id=ctx.document_id, permanent=permanent,
                             code=code, message=str(exc) or type(exc).__name__,
                             traceback="".join(traceback.format_exception(exc)))
        return str(state)
    finally:
        heartbeat.stop()
        metrics.stage_finished(stage=stage, queue=queue, seconds=time.monotonic() - began)
    if handoff.stage is not None:
        # The same job at its next stage (it keeps its slot), marked published by `advance`.
        publish(job_id, handoff.stage, mark=False)
        return "handed-off"
    metrics.job_outcome(kind=kind, queue=queue, state=JobState.SUCCEEDED)
    # Its slot is free (or, split into parts, it left flight and its parts are held).
    if handoff.held is not False:
        dispatch(ctx.workspace_id, kind, held=handoff.held)
    return JobState.SUCCEEDED
