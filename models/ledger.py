"""The job ledger: the only module that changes a job's state.

Every transition is a compare-and-set `UPDATE ... WHERE state = ... AND attempt = ...`, so a
duplicate or late delivery cannot run a finished stage again or move a job backwards. The
functions take a Session and never commit: the caller composes a transition with the data it
guards (chunks written + job advanced) in one short transaction, then publishes after commit.

    queued ──start──▶ running ──succeed──▶ succeeded
       ▲                 │  ├──advance──▶ queued (next stage)
       │                 │  ├──fail─────▶ failed      (permanent error)
       │                 │  ├──retry────▶ retrying ──▶ running ...
       │                 │  ├──retry────▶ dead        (retries exhausted)
       └──replay─────────┴──┴──cancel───▶ cancelled
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, literal, or_, select, update
from sqlalchemy.orm import Session

from models.entities import (
    FINAL_STATES,
    Job,
    JobAttempt,
    JobEvent,
    JobKind,
    JobState,
    Stage,
    utcnow,
)

STARTABLE = (JobState.QUEUED, JobState.RETRYING)


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that this worker holds `attempt` of `stage` of a job."""

    job_id: str
    stage: str
    attempt: int


def create_job(
    session: Session,
    *,
    workspace_id: str,
    kind: JobKind,
    stage: Stage,
    document_id: str | None = None,
    payload: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> Job:
    job = Job(
        workspace_id=workspace_id,
        kind=kind,
        stage=stage,
        document_id=document_id,
        payload=payload or {},
        request_id=request_id,
        state=JobState.QUEUED,
    )
    session.add(job)
    session.flush()
    _append_event(session, job.id)
    return job


def _cas(
    session: Session, job_id: str, where: list[Any], values: dict[str, Any], *,
    event: bool = True,
) -> bool:
    """Compare-and-set one job row; on success append the job's new state as an event."""
    values.setdefault("updated_at", utcnow())
    result = session.execute(
        update(Job).where(Job.id == job_id, *where).values(**values).execution_options(
            synchronize_session=False
        )
    )
    changed = bool(result.rowcount)  # type: ignore[attr-defined]
    if changed and event:
        _append_event(session, job_id)
    return changed


def _append_event(session: Session, job_id: str) -> None:
    columns = ("workspace_id", "kind", "state", "stage", "progress", "error_code",
               "error_message")
    session.execute(
        insert(JobEvent).from_select(
            ["job_id", *columns, "created_at"],
            select(Job.id, *(getattr(Job, c) for c in columns), literal(utcnow()))
            .where(Job.id == job_id),
        )
    )


def mark_published(session: Session, job_id: str) -> None:
    _cas(session, job_id, [Job.state.in_(STARTABLE)], {"published_at": utcnow()}, event=False)


def start(
    session: Session, *, job_id: str, stage: str, worker: str, stale_before: datetime
) -> Claim | None:
    """Claim the next attempt of `stage`, or None when this delivery must not run.

    A job is startable when queued or retrying at this stage, or running at this stage with a
    heartbeat older than `stale_before` (its worker died; this delivery takes over)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.stage != stage or job.cancel_requested:
        return None
    takeover = job.state == JobState.RUNNING and (
        job.heartbeat_at is None or _aware(job.heartbeat_at) < stale_before
    )
    if job.state not in STARTABLE and not takeover:
        return None
    if takeover:
        _close_attempt(session, job, outcome="lost", code="worker_lost",
                       message="worker stopped heartbeating; attempt taken over")
    now = utcnow()
    attempt = job.attempt + 1
    claimed = _cas(
        session,
        job_id,
        [Job.state == job.state, Job.attempt == job.attempt, Job.stage == stage],
        {
            "state": JobState.RUNNING,
            "attempt": attempt,
            "attempts_total": Job.attempts_total + 1,
            "worker": worker,
            "started_at": job.started_at or now,
            "heartbeat_at": now,
            "retry_at": None,
        },
    )
    if not claimed:
        return None
    session.add(
        JobAttempt(job_id=job_id, workspace_id=job.workspace_id, stage=stage,
                   attempt=attempt, worker=worker, started_at=now)
    )
    return Claim(job_id=job_id, stage=stage, attempt=attempt)


def _held(claim: Claim) -> list[Any]:
    return [Job.state == JobState.RUNNING, Job.stage == claim.stage, Job.attempt == claim.attempt]


def heartbeat(session: Session, claim: Claim, *, progress: float | None = None) -> bool:
    """Refresh the heartbeat (and record new progress as an event); False when the claim is
    no longer held (taken over, cancelled)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    return _cas(session, claim.job_id, [*_held(claim), Job.cancel_requested.is_(False)], values,
                event=progress is not None)


def advance(session: Session, claim: Claim, *, next_stage: Stage) -> bool:
    """Hand the job to its next stage (queued there, attempts counted afresh)."""
    ok = _cas(
        session,
        claim.job_id,
        _held(claim),
        {"state": JobState.QUEUED, "stage": next_stage, "attempt": 0, "published_at": None},
    )
    if ok:
        _end_attempt(session, claim, outcome="succeeded")
    return ok


def succeed(session: Session, claim: Claim, *, result: dict[str, Any] | None = None) -> bool:
    ok = _cas(
        session,
        claim.job_id,
        _held(claim),
        {"state": JobState.SUCCEEDED, "result": result, "finished_at": utcnow(),
         "progress": 1.0, "error_code": None, "error_message": None},
    )
    if ok:
        _end_attempt(session, claim, outcome="succeeded")
    return ok


def fail(
    session: Session, claim: Claim, *, code: str, message: str, traceback: str | None = None
) -> bool:
    """A permanent failure: never retried."""
    ok = _cas(
        session,
        claim.job_id,
        _held(claim),
        {"state": JobState.FAILED, "error_code": code, "error_message": message,
         "finished_at": utcnow()},
    )
    if ok:
        _end_attempt(session, claim, outcome="failed", code=code, message=message,
                     traceback=traceback)
    return ok


def retry_or_bury(
    session: Session,
    claim: Claim,
    *,
    max_retries: int,
    delay_s: float,
    code: str,
    message: str,
    traceback: str | None = None,
) -> JobState | None:
    """A transient failure: `retrying` (due after `delay_s`) while retries remain, else `dead`.
    Returns the new state, or None when the claim was no longer held."""
    exhausted = claim.attempt > max_retries
    state = JobState.DEAD if exhausted else JobState.RETRYING
    values: dict[str, Any] = {"state": state, "error_code": code, "error_message": message}
    if exhausted:
        values["finished_at"] = utcnow()
    else:
        values["retry_at"] = utcnow() + timedelta(seconds=delay_s)
        values["published_at"] = None
    if not _cas(session, claim.job_id, _held(claim), values):
        return None
    _end_attempt(session, claim, outcome=state, code=code, message=message, traceback=traceback)
    return state


def release(session: Session, claim: Claim) -> bool:
    """Give an interrupted attempt back (its worker is shutting down): queued again at the same
    stage, so the requeued message can start at once instead of waiting for a stale heartbeat."""
    ok = _cas(session, claim.job_id, _held(claim),
              {"state": JobState.QUEUED, "published_at": utcnow()})
    if ok:
        _end_attempt(session, claim, outcome="interrupted", code="worker_shutdown",
                     message="worker shut down during the attempt")
    return ok


def cancel(session: Session, *, job_id: str) -> JobState | None:
    """Cancel a job: at once when it has not started, at its next checkpoint when running.
    Returns the state after the request, None for an unknown job."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    state = JobState(job.state)
    if state in FINAL_STATES:
        return state
    if state == JobState.RUNNING:
        _cas(session, job_id, [Job.state == JobState.RUNNING], {"cancel_requested": True},
             event=False)
        return JobState.RUNNING
    if _cas(session, job_id, [Job.state == state, Job.attempt == job.attempt],
            {"state": JobState.CANCELLED, "cancel_requested": True, "finished_at": utcnow(),
             "error_code": "cancelled", "error_message": "cancelled before it started"}):
        return JobState.CANCELLED
    return JobState(session.get(Job, job_id, populate_existing=True).state)  # type: ignore[union-attr]


def acknowledge_cancel(session: Session, claim: Claim) -> bool:
    """A running job stopped at a checkpoint after a cancel request."""
    ok = _cas(
        session,
        claim.job_id,
        [Job.state == JobState.RUNNING, Job.stage == claim.stage, Job.attempt == claim.attempt],
        {"state": JobState.CANCELLED, "finished_at": utcnow(), "error_code": "cancelled",
         "error_message": "cancelled while running"},
    )
    if ok:
        _end_attempt(session, claim, outcome="cancelled", code="cancelled")
    return ok


def replay(session: Session, *, job_id: str) -> bool:
    """Put a dead (or failed) job back in the queue at the stage it ended in, keeping its
    attempt history."""
    return _cas(
        session,
        job_id,
        [Job.state.in_((JobState.DEAD, JobState.FAILED))],
        {"state": JobState.QUEUED, "attempt": 0, "replayed_at": utcnow(), "finished_at": None,
         "published_at": None, "error_code": None, "error_message": None,
         "cancel_requested": False},
    )


def jobs_needing_publish(
    session: Session, *, queued_before: datetime, limit: int = 500
) -> list[Job]:
    """Jobs that should have a message but may not: queued and never published (or published
    long ago), or retrying and overdue."""
    stmt = (
        select(Job)
        .where(
            or_(
                (Job.state == JobState.QUEUED)
                & or_(Job.published_at.is_(None), Job.published_at < queued_before)
                & (Job.updated_at < queued_before),
                (Job.state == JobState.RETRYING) & (Job.retry_at < queued_before),
            )
        )
        .order_by(Job.updated_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def stale_running(session: Session, *, stale_before: datetime, limit: int = 500) -> list[Job]:
    stmt = (
        select(Job)
        .where(Job.state == JobState.RUNNING, Job.heartbeat_at < stale_before)
        .order_by(Job.heartbeat_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def _end_attempt(
    session: Session,
    claim: Claim,
    *,
    outcome: str,
    code: str | None = None,
    message: str | None = None,
    traceback: str | None = None,
) -> None:
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == claim.job_id,
            JobAttempt.stage == claim.stage,
            JobAttempt.attempt == claim.attempt,
            JobAttempt.ended_at.is_(None),
        )
        .values(ended_at=utcnow(), outcome=outcome, error_code=code, error_message=message,
                traceback=traceback)
        .execution_options(synchronize_session=False)
    )


def _close_attempt(session: Session, job: Job, *, outcome: str, code: str, message: str) -> None:
    _end_attempt(session, Claim(job.id, job.stage, job.attempt), outcome=outcome, code=code,
                 message=message)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
