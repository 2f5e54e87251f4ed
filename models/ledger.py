"""The job ledger: the only module that changes a job's state.

Every transition is a compare-and-set `UPDATE ... WHERE state = ... AND attempt = ...`, so a
duplicate or late delivery cannot run a finished stage again or move a job backwards. The
functions take a Session and never commit: the caller composes a transition with the data it
guards (chunks written + job advanced) in one short transaction, then publishes after commit.
The two every job makes, `claim_at_once` and `succeed_at_once`, take a Core connection from
`sluice.db.transition_scope` instead (on PostgreSQL each is one statement, in autocommit).

    queued ──start──▶ running ──succeed──▶ succeeded
       ▲                 │  ├──advance──▶ queued (next stage)
       │                 │  ├──fail─────▶ failed      (permanent error)
       │                 │  ├──retry────▶ retrying ──▶ running ...
       │                 │  ├──retry────▶ dead        (retries exhausted)
       └──replay─────────┴──┴──cancel───▶ cancelled

A running job may also `split` into parts (a large PDF into page ranges): it waits, and each
part is a job of its own. The parent counts its parts in `parts_done` / `parts_failed`, moved
in the same transaction as each part's final transition (or its replay), always with the
parent's row locked first; the transaction whose count completes the set moves the parent on:

    running ──split──▶ waiting ──all parts succeeded──▶ queued (next stage)
                          ├──all settled, one failed──▶ failed (part_failed)
                          └──cancel───────────────────▶ cancelled (its parts too)
    failed (part_failed) ──a failed part replayed──▶ waiting

A queued job may be *held* (created, split off or replayed while its workspace is at its
in-flight cap, see `models.fairness`): no message is published for it and no delivery starts
it until `dispatch_held` takes it out of hold, when one of its workspace's jobs has ended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Select,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from models import documents
from models.entities import (
    FINAL_STATES,
    Job,
    JobAttempt,
    JobEvent,
    JobKind,
    JobState,
    Stage,
    new_id,
    utcnow,
)
from sluice.logs import current_request_id

STARTABLE = (JobState.QUEUED, JobState.RETRYING)
PART_FAILED = "part_failed"
# The stage a parent goes on to once every part succeeded, by the stage it split at.
AFTER_PARTS = {Stage.PARSE: Stage.EMBED}
PARTS_PROGRESS_SHARE = 0.4  # of a parent's progress (parse's share of an ingest)
FAILED_PARTS_LISTED = 10
SETTLED_FAILED = (JobState.FAILED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that this worker holds `attempt` of `stage` of a job."""

    job_id: str
    stage: str
    attempt: int
    parent_id: str | None = field(default=None, compare=False)
    parent_known: bool = field(default=False, compare=False)
    """`parent_id` was read with the claim (None: not a part), so the claim's transitions
    need not read it again; a claim made elsewhere leaves it unknown."""
    job: Any = field(default=None, compare=False, repr=False)
    """The job's row as `start` claimed it (its state as before the claim if it took over;
    from `claim_at_once`, its `_CLAIMED_COLUMNS`), for the worker to read the job's own
    fields without another query."""


def create_job(
    session: Session,
    *,
    workspace_id: str,
    kind: JobKind,
    stage: Stage,
    document_id: str | None = None,
    payload: dict[str, Any] | None = None,
    request_id: str | None = None,
    parent_id: str | None = None,
    held: bool = False,
    published: bool = False,
) -> Job:
    """Queue a new job. `request_id` (default: the current request's, from the log context)
    follows the job through every stage's messages and log lines. A part is created by
    `split`, which sets `parent_id`. A `held` job waits for a slot of its workspace
    (`models.fairness`): no message is published for it until `dispatch_held`. `published`:
    the caller publishes its message right after commit (`publish(..., mark=False)`), so
    it is marked published now, in this transaction, as `dispatch_held` does; a message lost
    on the way is republished like any other (`jobs_needing_publish`)."""
    job = Job(**_new_job(job_id=new_id(), workspace_id=workspace_id, kind=kind, stage=stage,
                         document_id=document_id, payload=payload,
                         request_id=request_id or current_request_id(), parent_id=parent_id,
                         held=held, published=published))
    session.add(job)
    session.flush()
    _append_event(session, job.id)
    return job


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job for `insert_jobs`: `create_job`'s arguments but a part's."""

    workspace_id: str
    kind: JobKind
    stage: Stage
    request_id: str | None
    """As given (in a batch the log context is another request's)."""
    document_id: str | None = None
    payload: dict[str, Any] | None = None
    held: bool = False
    published: bool = False
    id: str = field(default_factory=new_id)


def insert_jobs(session: Session, jobs: Sequence[NewJob]) -> None:
    """`create_job` for callers that need no Job objects (uploads, recorded in batches; a
    question): the same rows and first events, written by prebuilt Core inserts (one
    `executemany` for every job) instead of an ORM flush and an INSERT ... SELECT per job,
    which cost an upload more CPU than the rest of its transaction. On PostgreSQL a job and
    its event are one statement (a CTE), one round trip less."""
    if not jobs:
        return
    rows = [_new_job(job_id=j.id, workspace_id=j.workspace_id, kind=j.kind, stage=j.stage,
                     document_id=j.document_id, payload=j.payload, request_id=j.request_id,
                     held=j.held, published=j.published)
            for j in jobs]
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_insert_job_and_event(), rows)
        return
    session.execute(_INSERT_JOB, rows)
    session.execute(_INSERT_EVENT, [  # what _APPEND_EVENT copies from a job's row
        {"job_id": r["id"], "created_at": r["created_at"],
         **{c: r.get(c) for c in _EVENT_COLUMNS}} for r in rows])


def _new_job(
    *, job_id: str, workspace_id: str, kind: JobKind, stage: Stage, document_id: str | None,
    payload: dict[str, Any] | None = None, request_id: str | None,
    parent_id: str | None = None, held: bool, published: bool,
) -> dict[str, Any]:
    """The columns of a new job's row that are not the table's defaults."""
    if held and published:
        raise ValueError("a held job has no message to publish")
    now = utcnow()
    return {
        "id": job_id, "workspace_id": workspace_id, "kind": kind, "stage": stage,
        "document_id": document_id, "payload": payload or {}, "request_id": request_id,
        "parent_id": parent_id, "state": JobState.QUEUED, "progress": 0.0, "held": held,
        "published_at": now if published else None, "created_at": now, "updated_at": now,
    }


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


def _append_event(session: Session | Connection, job_id: str) -> None:
    session.execute(_APPEND_EVENT, {"job_id": job_id, "created_at": utcnow()})


_EVENT_COLUMNS = ("workspace_id", "kind", "state", "stage", "progress", "error_code",
                  "error_message")
# Built once: every transition runs it, and building it costs more CPU than running it.
_APPEND_EVENT = insert(JobEvent.__table__).from_select(  # the table: not an ORM bulk insert
    ["job_id", *_EVENT_COLUMNS, "created_at"],
    select(Job.id, *(getattr(Job, c) for c in _EVENT_COLUMNS),
           bindparam("created_at", type_=JobEvent.__table__.c.created_at.type))
    .where(Job.id == bindparam("job_id")),
)
# (the table, not the entity: plain Core inserts, their defaults applied as the ORM's are)
_INSERT_JOB = insert(Job.__table__)
_INSERT_EVENT = insert(JobEvent.__table__)


def mark_published(session: Session, job_id: str) -> None:
    _cas(session, job_id, [Job.state.in_(STARTABLE)], {"published_at": utcnow()}, event=False)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A held job taken out of hold: publish `stage` for it after commit."""

    job_id: str
    stage: str
    request_id: str | None


def dispatch_held(session: Session, *, job_ids: Sequence[str]) -> list[Dispatch]:
    """Take the held jobs `job_ids` out of hold, marked published (they stay queued; the
    caller publishes their messages after commit; one lost on the way is republished like any
    other, see `jobs_needing_publish`). A job no longer held and queued (cancelled meanwhile,
    or taken by a concurrent dispatch) is left alone and not returned."""
    if not job_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.held.is_(True), Job.state == JobState.QUEUED)
        .values(held=False, published_at=now, updated_at=now)
        .returning(Job.id, Job.stage, Job.request_id)
        .execution_options(synchronize_session=False)
    ).all()
    # In the order they were held (RETURNING keeps none): the broker gets the oldest first.
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    return [Dispatch(job_id=r.id, stage=r.stage, request_id=r.request_id)
            for r in sorted(rows, key=lambda r: order[r.id])]


def start(
    session: Session, *, job_id: str, stage: str, worker: str, stale_before: datetime
) -> Claim | None:
    """Claim the next attempt of `stage`, or None when this delivery must not run.

    A job is startable when queued or retrying at this stage, or running at this stage with a
    heartbeat older than `stale_before` (its worker died; this delivery takes over).

    The common case, a queued or retrying job, is claimed by one compare-and-set that returns
    the row (`_claim`); anything else reads the row locked first."""
    return _claim(session, job_id=job_id, stage=stage, worker=worker) or _start_locked(
        session, job_id=job_id, stage=stage, worker=worker, stale_before=stale_before)


def _claim(
    executor: Session | Connection, *, job_id: str, stage: str, worker: str
) -> Claim | None:
    """The common case of `start` (and of `claim_at_once` on SQLite): claim, event, attempt."""
    now = utcnow()
    row = executor.execute(_claim_core(), {"of_job": job_id, "of_stage": stage,
                                           "by_worker": worker, "now": now}).first()
    if row is None:
        return None
    _append_event(executor, job_id)
    return _begin_attempt(executor, row, stage=stage, worker=worker, now=now)


_NOW = bindparam("now", type_=Job.__table__.c.updated_at.type)


def _start_locked(
    session: Session, *, job_id: str, stage: str, worker: str, stale_before: datetime
) -> Claim | None:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.stage != stage or job.cancel_requested or job.held:
        return None  # (a stray message for a held job: it runs once dispatched, in its turn)
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
    return _begin_attempt(session, job, stage=stage, worker=worker, now=now, attempt=attempt)


def _begin_attempt(session: Session | Connection, job: Any, *, stage: str, worker: str,
                   now: datetime, attempt: int | None = None) -> Claim:
    attempt = job.attempt if attempt is None else attempt
    session.execute(_BEGIN_ATTEMPT, {"job_id": job.id, "workspace_id": job.workspace_id,
                                     "stage": stage, "attempt": attempt, "worker": worker,
                                     "started_at": now})
    return Claim(job_id=job.id, stage=stage, attempt=attempt, parent_id=job.parent_id,
                 parent_known=True, job=job)


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
    """Hand the job to its next stage (queued there, attempts counted afresh). The caller
    publishes its message right after commit (`publish(..., mark=False)`), so it is marked
    published now, as `create_job(published=True)` does: a message lost on the way is
    republished like any other (`jobs_needing_publish`)."""
    ok = _cas(
        session,
        claim.job_id,
        _held(claim),
        {"state": JobState.QUEUED, "stage": next_stage, "attempt": 0, "published_at": utcnow()},
    )
    if ok:
        _end_attempt(session, claim, outcome="succeeded")
    return ok


def succeed(session: Session, claim: Claim, *, result: dict[str, Any] | None = None) -> bool:
    parent = _lock_claim_parent(session, claim)
    if parent is not None:
        return _succeed_part(session, claim, parent, result) is not None
    return _succeed(session, claim, result=result)


def _succeed(
    executor: Session | Connection, claim: Claim, *, result: dict[str, Any] | None
) -> bool:
    """`succeed` for a job that is not a part (and `succeed_at_once` on SQLite)."""
    now = utcnow()
    ok = bool(executor.execute(_succeed_core(), {  # type: ignore[attr-defined]
        "of_job": claim.job_id, "of_stage": claim.stage, "of_attempt": claim.attempt,
        "result": result, "now": now}).rowcount)
    if ok:
        _append_event(executor, claim.job_id)
        _end_attempt(executor, claim, outcome="succeeded")
    return ok


def fail(
    session: Session, claim: Claim, *, code: str, message: str, traceback: str | None = None
) -> bool:
    """A permanent failure: never retried."""
    parent = _lock_claim_parent(session, claim)
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
        if parent is not None:
            _count(session, parent, failed=1)
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
    A job that was asked to cancel during the attempt ends `cancelled` instead: it would never
    start again, only be republished forever. Returns the new state, or None when the claim
    was no longer held."""
    parent = _lock_claim_parent(session, claim)
    job = session.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
    exhausted = claim.attempt > max_retries
    state = JobState.DEAD if exhausted else JobState.RETRYING
    values: dict[str, Any] = {"state": state, "error_code": code, "error_message": message}
    if job is not None and job.cancel_requested:
        state = JobState.CANCELLED
        values = {"state": state, "finished_at": utcnow(), "error_code": "cancelled",
                  "error_message": f"cancelled while running (the attempt then failed: {code})"}
    elif exhausted:
        values["finished_at"] = utcnow()
    else:
        values["retry_at"] = utcnow() + timedelta(seconds=delay_s)
        values["published_at"] = None
    if not _cas(session, claim.job_id, _held(claim), values):
        return None
    _end_attempt(session, claim, outcome=state, code=code, message=message, traceback=traceback)
    if parent is not None and state != JobState.RETRYING:
        _count(session, parent, failed=1)
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
    Returns the state after the request, None for an unknown job. A parent waiting for its
    parts is cancelled with them, and its document's chunks go (as a running ingest's do at
    its next checkpoint); a part cancelled on its own fails its parent."""
    parent = _lock_parent(session, job_id)
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
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
        if parent is not None:
            _count(session, parent, failed=1)
        if state == JobState.WAITING:
            _cancel_parts(session, job)
        return JobState.CANCELLED
    return JobState(session.get(Job, job_id, populate_existing=True).state)  # type: ignore[union-attr]


def acknowledge_cancel(session: Session, claim: Claim) -> bool:
    """A running job stopped at a checkpoint after a cancel request."""
    parent = _lock_claim_parent(session, claim)
    ok = _cas(
        session,
        claim.job_id,
        [Job.state == JobState.RUNNING, Job.stage == claim.stage, Job.attempt == claim.attempt],
        {"state": JobState.CANCELLED, "finished_at": utcnow(), "error_code": "cancelled",
         "error_message": "cancelled while running"},
    )
    if ok:
        _end_attempt(session, claim, outcome="cancelled", code="cancelled")
        if parent is not None:
            _count(session, parent, failed=1)
    return ok


def replay(session: Session, *, job_id: str, held: bool = False) -> bool:
    """Put a dead (or failed) job back in the queue at the stage it ended in, keeping its
    attempt history; `held`, it waits for a slot of its workspace like a new job
    (`models.fairness`).

    A replayed part no longer counts as failed: its parent, failed for it, waits again. A
    part of a cancelled parent is not replayed, nor is a parent failed by its parts (replay
    those parts instead)."""
    parent = _lock_parent(session, job_id)
    if parent is not None and not _may_wait_again(parent):
        return False
    ok = _cas(
        session,
        job_id,
        [Job.state.in_((JobState.DEAD, JobState.FAILED)),
         or_(Job.error_code.is_(None), Job.error_code != PART_FAILED)],
        {"state": JobState.QUEUED, "attempt": 0, "replayed_at": utcnow(), "finished_at": None,
         "published_at": None, "error_code": None, "error_message": None,
         "cancel_requested": False, "held": held},
    )
    if ok and parent is not None:
        _count(session, parent, failed=-1)
    return ok


# --- Fan-in: a job split into parts -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FanIn:
    """A parent's counters after one of its parts settled (or was replayed)."""

    parent_id: str
    total: int
    done: int
    failed: int
    released: str | None = None
    """The stage this transition queued the parent at (it was the last part): publish the
    parent's message for it after commit."""


def split(
    session: Session, claim: Claim, *, parts: Sequence[Mapping[str, Any]],
    kind: JobKind = JobKind.INGEST_PART, held: bool = False,
) -> list[str] | None:
    """Park the running job of `claim` as a parent that waits for one new part job per payload
    in `parts`, queued at the claim's stage (publish them after commit; `held`: they wait for
    slots of the workspace, see `models.fairness`). Returns the parts' ids; None, with
    nothing created, when the claim is no longer held or a cancel was requested."""
    if claim.stage not in AFTER_PARTS or not parts:
        raise ValueError(f"a job cannot split into {len(parts)} parts at stage {claim.stage!r}")
    if not _cas(session, claim.job_id, [*_held(claim), Job.cancel_requested.is_(False)],
                {"state": JobState.WAITING, "parts_total": len(parts), "parts_done": 0,
                 "parts_failed": 0, "progress": 0.0, "published_at": None}):
        return None
    _end_attempt(session, claim, outcome="split")
    workspace_id, request_id = session.execute(
        select(Job.workspace_id, Job.request_id).where(Job.id == claim.job_id)).one()
    return [
        create_job(session, workspace_id=workspace_id, kind=kind, stage=Stage(claim.stage),
                   payload=dict(payload), request_id=request_id, parent_id=claim.job_id,
                   held=held).id
        for payload in parts
    ]


def succeed_part(
    session: Session, claim: Claim, *, result: dict[str, Any] | None = None
) -> FanIn | None:
    """`succeed` for a part, counted on its parent: the returned counters say whether this
    was the last part (`released`). None when the claim is no longer held, a cancel was
    requested, or the parent no longer waits (it was cancelled, and so was this part):
    whatever the caller wrote with it must roll back."""
    parent = _lock_claim_parent(session, claim)
    if parent is None:
        raise ValueError(f"job {claim.job_id} is not a part")
    return _succeed_part(session, claim, parent, result)


def parent_waits(session: Session, job_id: str) -> bool:
    """Lock part `job_id`'s parent (first, as every transition of a part does) and say whether
    it still waits for its parts. Call it before writing a part's results, so that nothing
    is written for a parent that was cancelled meanwhile."""
    parent = _lock_parent(session, job_id)
    return parent is not None and parent.state == JobState.WAITING


def _succeed_part(
    session: Session, claim: Claim, parent: Job, result: dict[str, Any] | None
) -> FanIn | None:
    if parent.state != JobState.WAITING:
        return None
    if not _cas(
        session,
        claim.job_id,
        [*_held(claim), Job.cancel_requested.is_(False)],
        {"state": JobState.SUCCEEDED, "result": result, "finished_at": utcnow(),
         "progress": 1.0, "error_code": None, "error_message": None},
    ):
        return None
    _end_attempt(session, claim, outcome="succeeded")
    return _count(session, parent, done=1)


def _lock_claim_parent(session: Session, claim: Claim) -> Job | None:
    """`_lock_parent` for the job of `claim`, without reading its parent id again when the
    claim knows it."""
    if not claim.parent_known:
        return _lock_parent(session, claim.job_id)
    if claim.parent_id is None:
        return None
    return session.get(Job, claim.parent_id, with_for_update=True, populate_existing=True)


def _lock_parent(session: Session, job_id: str) -> Job | None:
    """The parent of part `job_id`, its row locked for this transaction (None for a job that
    is not a part). Every transition of a part locks its parent before the part, and a
    parent's cancel locks the parent before its parts: one order, no deadlock, and the
    counter's read-modify-write is serialised (SQLite's write lock does the same)."""
    parent_id = session.scalar(select(Job.parent_id).where(Job.id == job_id))
    if parent_id is None:
        return None
    return session.get(Job, parent_id, with_for_update=True, populate_existing=True)


def _count(session: Session, parent: Job, *, done: int = 0, failed: int = 0) -> FanIn:
    """Move the parent's counters; when they complete the set, move the parent on: queued at
    its next stage when every part succeeded, failed (`part_failed`) when one did not."""
    total, done_now, failed_now = session.execute(
        update(Job).where(Job.id == parent.id)
        .values(parts_done=Job.parts_done + done, parts_failed=Job.parts_failed + failed)
        .returning(Job.parts_total, Job.parts_done, Job.parts_failed)
        .execution_options(synchronize_session=False)
    ).one()
    fan = FanIn(parent_id=parent.id, total=total, done=done_now, failed=failed_now)
    if failed < 0 and parent.state == JobState.FAILED and parent.error_code == PART_FAILED:
        # A failed part was replayed: the parent waits for it again.
        if _cas(session, parent.id, [Job.state == JobState.FAILED],
                {"state": JobState.WAITING, "finished_at": None, "error_code": None,
                 "error_message": None}) and parent.document_id is not None:
            documents.mark_requeued(session, document_id=parent.document_id)
        return fan
    if parent.state != JobState.WAITING:
        return fan  # cancelled: the count is kept true, nothing moves
    waiting = [Job.state == JobState.WAITING]
    if done_now == total:
        next_stage = AFTER_PARTS[Stage(parent.stage)]
        if _cas(session, parent.id, waiting,
                {"state": JobState.QUEUED, "stage": next_stage, "attempt": 0,
                 "published_at": None, "progress": PARTS_PROGRESS_SHARE}):
            return replace(fan, released=next_stage)
    elif done_now + failed_now == total:
        message = _failed_parts_message(session, parent.id, failed=failed_now, total=total)
        if _cas(session, parent.id, waiting,
                {"state": JobState.FAILED, "error_code": PART_FAILED, "error_message": message,
                 "finished_at": utcnow()}) and parent.document_id is not None:
            documents.mark_failed(session, document_id=parent.document_id, code=PART_FAILED,
                                  message=message)
    elif done:
        _cas(session, parent.id, waiting,
             {"progress": PARTS_PROGRESS_SHARE * done_now / total})
    return fan


def _may_wait_again(parent: Job) -> bool:
    return parent.state == JobState.WAITING or (
        parent.state == JobState.FAILED and parent.error_code == PART_FAILED)


def _cancel_parts(session: Session, parent: Job) -> None:
    part_ids = session.scalars(
        select(Job.id).where(Job.parent_id == parent.id, Job.state.not_in(FINAL_STATES))
        .order_by(Job.id)
    ).all()
    for part_id in part_ids:
        cancel(session, job_id=part_id)
    if parent.document_id is not None:
        documents.mark_cancelled(session, document_id=parent.document_id)


def _failed_parts_message(session: Session, parent_id: str, *, failed: int, total: int) -> str:
    rows = session.execute(
        select(Job.id, Job.payload, Job.error_code, Job.error_message)
        .where(Job.parent_id == parent_id, Job.state.in_(SETTLED_FAILED))
        .order_by(Job.created_at, Job.id)
        .limit(FAILED_PARTS_LISTED)
    ).all()
    listed = "; ".join(
        f"{(payload or {}).get('label') or part_id} ({code}: {(message or '')[:200]})"
        for part_id, payload, code, message in rows
    )
    more = f"; and {failed - len(rows)} more" if failed > len(rows) else ""
    return f"{failed} of {total} parts failed: {listed}{more}"


def jobs_needing_publish(
    session: Session, *, queued_before: datetime, limit: int = 500
) -> list[Job]:
    """Jobs that should have a message but may not: queued and never published (or published
    long ago), or retrying and overdue. Never a held job: it has no message on purpose, and
    is dispatched within its workspace's cap (`models.fairness`), not republished."""
    stmt = (
        select(Job)
        .where(
            or_(
                (Job.state == JobState.QUEUED) & Job.held.is_(False)
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
    session: Session | Connection,
    claim: Claim,
    *,
    outcome: str,
    code: str | None = None,
    message: str | None = None,
    traceback: str | None = None,
) -> None:
    session.execute(_END_ATTEMPT, {
        "of_job": claim.job_id, "of_stage": claim.stage, "of_attempt": claim.attempt,
        "ended": utcnow(), "outcome": outcome, "code": code, "message": message,
        "traceback": traceback})


_attempts = JobAttempt.__table__  # Core: with a parameter dict, an ORM update is a bulk one
# Built once, as _APPEND_EVENT (an ORM add would cost a unit-of-work flush per claim).
_BEGIN_ATTEMPT = insert(_attempts)
_END_ATTEMPT = (
    update(_attempts)
    .where(_attempts.c.job_id == bindparam("of_job"), _attempts.c.stage == bindparam("of_stage"),
           _attempts.c.attempt == bindparam("of_attempt"), _attempts.c.ended_at.is_(None))
    .values(ended_at=bindparam("ended", type_=_attempts.c.ended_at.type),
            outcome=bindparam("outcome"), error_code=bindparam("code"),
            error_message=bindparam("message"), traceback=bindparam("traceback"))
)


def _close_attempt(session: Session, job: Job, *, outcome: str, code: str, message: str) -> None:
    _end_attempt(session, Claim(job.id, job.stage, job.attempt), outcome=outcome, code=code,
                 message=message)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- The two transitions every job makes, for less CPU and fewer round trips --------------------
# `start` and `succeed` run through a Session and the ORM, a few statements in a transaction;
# on PostgreSQL each statement is a round trip, and BEGIN and COMMIT two more. A no-op job's
# claim and success made eleven, and with the ORM's work per statement they were most of a
# worker's CPU per job. Their common cases are also written here on a Core connection from
# `sluice.db.transition_scope`: on PostgreSQL as one statement each (data-modifying CTEs: the
# row's RETURNING feeds its event and its attempt) in autocommit, one round trip, atomic as any
# statement is; on SQLite, in-process, as the same few statements in a transaction. The rows
# written are the ones `start` and `succeed` write (tests/tasks/test_ledger.py compares them).

_CLAIMED_COLUMNS = ("id", "workspace_id", "document_id", "kind", "payload", "request_id",
                    "parent_id", "attempt")


def claim_at_once(conn: Connection, *, job_id: str, stage: str, worker: str) -> Claim | None:
    """`start`'s common case: a queued or retrying job claimed. None when it is not claimable
    so: call `start` in a transaction, which takes a stale claim over or says no. The claim's
    `job` is the row's `_CLAIMED_COLUMNS`."""
    if conn.dialect.name != "postgresql":
        return _claim(conn, job_id=job_id, stage=stage, worker=worker)
    row = conn.execute(_claim_at_once(), {"of_job": job_id, "of_stage": stage,
                                          "by_worker": worker, "now": utcnow()}).first()
    if row is None:
        return None
    return Claim(job_id=row.id, stage=stage, attempt=row.attempt, parent_id=row.parent_id,
                 parent_known=True, job=row)


def succeed_at_once(
    conn: Connection, claim: Claim, *, result: dict[str, Any] | None, workspace_id: str,
    held: Select[Any],
) -> tuple[bool, bool]:
    """`succeed` for a claim that is not a part's, and `held`, the test of whether jobs wait
    in its workspace (a `fairness.HAS_HELD` statement, read after the change, in the same
    statement on PostgreSQL): (succeeded, held). Not succeeded: the claim was no longer held."""
    if not claim.parent_known or claim.parent_id is not None:
        raise ValueError(f"job {claim.job_id}: a part's success is counted on its parent")
    if conn.dialect.name != "postgresql":
        ok = _succeed(conn, claim, result=result)
        return ok, bool(conn.scalar(held, {"of_workspace": workspace_id}))
    ok, waiting = conn.execute(_succeed_at_once(held), {
        "of_job": claim.job_id, "of_stage": claim.stage, "of_attempt": claim.attempt,
        "result": result, "now": utcnow(), "of_workspace": workspace_id}).one()
    return bool(ok), bool(waiting)


def _event_of(changed: Any, *, at: Any = _NOW) -> Any:
    """The event `_append_event` writes, for each row the CTE `changed` returned."""
    return insert(_jobs_events).from_select(
        ["job_id", *_EVENT_COLUMNS, "created_at"],
        select(changed.c.id, *(changed.c[c] for c in _EVENT_COLUMNS), at))


@cache
def _claim_core() -> Any:
    """The claim's compare-and-set, returning the claim's columns (and what the event copies).
    Built once: every delivery runs it."""
    jobs = _jobs
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("of_job"), jobs.c.stage == bindparam("of_stage"),
               jobs.c.state.in_(STARTABLE), jobs.c.cancel_requested.is_(False),
               jobs.c.held.is_(False))
        .values(state=JobState.RUNNING, attempt=jobs.c.attempt + 1,
                attempts_total=jobs.c.attempts_total + 1, worker=bindparam("by_worker"),
                started_at=func.coalesce(jobs.c.started_at, _NOW), heartbeat_at=_NOW,
                retry_at=None, updated_at=_NOW)
        .returning(*{c: jobs.c[c] for c in (*_CLAIMED_COLUMNS, *_EVENT_COLUMNS)}.values())
    )


@cache
def _claim_at_once() -> Select[Any]:
    claimed = _claim_core().cte("claimed")
    attempt = insert(_attempts).from_select(
        ["job_id", "workspace_id", "stage", "attempt", "worker", "started_at"],
        select(claimed.c.id, claimed.c.workspace_id, claimed.c.stage, claimed.c.attempt,
               bindparam("by_worker"), _NOW))
    return (select(*(claimed.c[c] for c in _CLAIMED_COLUMNS))
            .add_cte(_event_of(claimed).cte("claim_event"), attempt.cte("claim_attempt")))


@cache
def _succeed_core() -> Any:
    """The success's compare-and-set (Core: with a parameter dict, an ORM update is a bulk one)."""
    jobs = _jobs
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("of_job"), jobs.c.state == JobState.RUNNING,
               jobs.c.stage == bindparam("of_stage"), jobs.c.attempt == bindparam("of_attempt"))
        .values(state=JobState.SUCCEEDED,
                result=bindparam("result", type_=_RESULT_TYPE),
                finished_at=_NOW, progress=1.0, error_code=None, error_message=None,
                updated_at=_NOW)
    )


@cache
def _succeed_at_once(held: Select[Any]) -> Select[Any]:
    jobs = _jobs
    succeeded = (_succeed_core()
                 .returning(jobs.c.id, *(jobs.c[c] for c in _EVENT_COLUMNS))
                 .cte("succeeded"))
    ended = (
        update(_attempts)
        .where(_attempts.c.job_id.in_(select(succeeded.c.id)),
               _attempts.c.stage == bindparam("of_stage"),
               _attempts.c.attempt == bindparam("of_attempt"), _attempts.c.ended_at.is_(None))
        .values(ended_at=_NOW, outcome="succeeded", error_code=None, error_message=None,
                traceback=None)
    )
    # The held jobs as the statement began: it changes none of them.
    return (select(exists(select(succeeded.c.id)), held.scalar_subquery())
            .add_cte(_event_of(succeeded).cte("success_event"), ended.cte("success_attempt")))


@cache
def _insert_job_and_event() -> Any:
    """`_INSERT_JOB` and `_INSERT_EVENT` in one statement, for the columns `_new_job` sets (and
    the table's Python-side defaults, which a CTE's insert does not apply)."""
    columns = ("id", "workspace_id", "kind", "stage", "document_id", "payload", "request_id",
               "parent_id", "state", "progress", "held", "published_at", "created_at",
               "updated_at")
    new = (insert(_jobs)
           .values({**{c: bindparam(c, type_=_jobs.c[c].type) for c in columns},
                    "attempt": 0, "attempts_total": 0, "cancel_requested": False})
           .returning(*(_jobs.c[c] for c in ("id", *_EVENT_COLUMNS, "created_at")))
           .cte("new_job"))
    return _event_of(new, at=new.c.created_at)


_jobs = Job.__table__
_jobs_events = JobEvent.__table__
# None is SQL NULL, as `succeed`'s ORM update writes it (a JSON type's bind writes JSON null)
_RESULT_TYPE = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
