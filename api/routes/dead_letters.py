"""Dead letters: jobs whose retries ran out, with every attempt; inspect, replay, discard."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel
from sqlalchemy import Select, delete, select

from api.deps import AdminWorkspaceDep, SessionDep
from api.errors import ApiError, not_found
from api.routes.jobs import job_out
from api.schemas import ErrorBody, JobOut, UtcDateTime
from api.state import dispatch_held
from models import Job, JobAttempt, JobState, documents, ledger
from sluice.db import session_scope
from tasks.names import QUEUE_OF_TASK, TASK_OF_STAGE

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])

STAGES_OF_QUEUE = {
    queue: [stage for stage, task in TASK_OF_STAGE.items() if task == t]
    for t, queue in QUEUE_OF_TASK.items()
}


class AttemptOut(BaseModel):
    attempt: int
    stage: str
    worker: str | None
    started_at: UtcDateTime
    ended_at: UtcDateTime | None
    outcome: str | None
    error_code: str | None
    error_message: str | None
    traceback: str | None


class DeadLetter(JobOut):
    queue: str
    replayed_at: UtcDateTime | None
    attempts_detail: list[AttemptOut] = []


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetter]


class ReplayResult(BaseModel):
    replayed: list[str]


def _filtered(
    workspace: str,
    queue: str | None,
    error_code: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Select[tuple[Job]]:
    stmt = select(Job).where(Job.workspace_id == workspace, Job.state == JobState.DEAD)
    if queue is not None:
        if queue not in STAGES_OF_QUEUE:
            raise ApiError(422, "validation_error", f"unknown queue {queue!r}")
        stmt = stmt.where(Job.stage.in_(STAGES_OF_QUEUE[queue]))
    if error_code is not None:
        stmt = stmt.where(Job.error_code == error_code)
    if since is not None:
        stmt = stmt.where(Job.finished_at >= since)
    if until is not None:
        stmt = stmt.where(Job.finished_at < until)
    return stmt


def _dead_letter(job: Job, attempts: list[JobAttempt] | None = None) -> DeadLetter:
    return DeadLetter(
        **job_out(job).model_dump(),
        queue=QUEUE_OF_TASK[TASK_OF_STAGE[job.stage]],
        replayed_at=job.replayed_at,
        attempts_detail=[AttemptOut.model_validate(a, from_attributes=True)
                         for a in attempts or []],
    )


Queue = Annotated[str | None, Query(description="parse, embed, answer or maintenance")]


@router.get("", response_model=DeadLetterList)
def list_dead_letters(
    session: SessionDep,
    workspace: AdminWorkspaceDep,
    queue: Queue = None,
    error_code: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeadLetterList:
    """Dead jobs of the workspace, newest first, filtered by queue, error code and time."""
    stmt = _filtered(workspace, queue, error_code, since, until)
    jobs = session.scalars(stmt.order_by(Job.finished_at.desc(), Job.id).limit(limit))
    return DeadLetterList(dead_letters=[_dead_letter(job) for job in jobs])


@router.get("/{job_id}", response_model=DeadLetter, responses={404: {"model": ErrorBody}})
def get_dead_letter(
    job_id: str, session: SessionDep, workspace: AdminWorkspaceDep
) -> DeadLetter:
    """One dead job with every attempt, its error and traceback."""
    job = _owned_dead(session, workspace, job_id)
    attempts = session.scalars(
        select(JobAttempt).where(JobAttempt.job_id == job_id)
        .order_by(JobAttempt.started_at, JobAttempt.id)
    ).all()
    return _dead_letter(job, list(attempts))


@router.post("/{job_id}/replay", response_model=JobOut, responses={404: {"model": ErrorBody}})
def replay_dead_letter(job_id: str, workspace: AdminWorkspaceDep) -> JobOut:
    """Queue the job again at the stage where it died; its history is kept. It is published
    within its workspace's in-flight cap, like a new job (`held` until there is a slot)."""
    with session_scope() as session:
        kind = _replay(session, _owned_dead(session, workspace, job_id))
    if kind is not None:
        dispatch_held(workspace, kind)
    with session_scope() as session:
        return job_out(session.get_one(Job, job_id))


@router.post("/replay", response_model=ReplayResult)
def replay_dead_letters(
    workspace: AdminWorkspaceDep,
    queue: Queue = None,
    error_code: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ReplayResult:
    """Replay every dead job matching the filter; they go out within the workspace's
    in-flight cap, oldest first, the rest as earlier ones end."""
    with session_scope() as session:
        jobs = session.scalars(_filtered(workspace, queue, error_code, since, until)).all()
        replayed = [(j.id, kind) for j in jobs if (kind := _replay(session, j)) is not None]
    for kind in sorted({kind for _, kind in replayed}):
        dispatch_held(workspace, kind)
    return ReplayResult(replayed=[job_id for job_id, _ in replayed])


@router.delete("/{job_id}", status_code=204, responses={404: {"model": ErrorBody}})
def discard_dead_letter(job_id: str, workspace: AdminWorkspaceDep) -> Response:
    """Discard a dead job and its attempts for good."""
    with session_scope() as session:
        _owned_dead(session, workspace, job_id)
        session.execute(delete(Job).where(Job.id == job_id, Job.state == JobState.DEAD))
    return Response(status_code=204)


def _replay(session: SessionDep, job: Job) -> str | None:
    """Back to queued, held, at the stage it died in; returns its kind (to dispatch its lane
    after commit)."""
    if not ledger.replay(session, job_id=job.id, held=True):
        return None
    if job.document_id is not None:
        documents.mark_requeued(session, document_id=job.document_id)
    return job.kind


def _owned_dead(session: SessionDep, workspace: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.workspace_id != workspace or job.state != JobState.DEAD:
        raise not_found("dead letter", job_id)
    return job
