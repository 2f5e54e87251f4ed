"""Jobs: the ledger as clients see it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import SessionDep, WorkspaceDep, WriterWorkspaceDep
from api.errors import not_found
from api.schemas import ErrorBody, ErrorInfo, JobOut, PartsOut
from api.state import dispatch_held
from models import Job, JobState, ledger
from sluice.db import session_scope

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, stage=job.stage, attempts=job.attempts_total,
        progress=job.progress, document_id=job.document_id,
        error=ErrorInfo(code=job.error_code, message=job.error_message or "")
        if job.error_code else None,
        result=job.result, created_at=job.created_at, updated_at=job.updated_at,
        finished_at=job.finished_at, request_id=job.request_id,
        parts=PartsOut(total=job.parts_total, done=job.parts_done, failed=job.parts_failed)
        if job.parts_total else None,
        parent_id=job.parent_id,
        held=bool(job.held) and job.state == JobState.QUEUED,
    )


def owned_job(session: SessionDep, workspace: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.workspace_id != workspace:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorBody}})
def get_job(job_id: str, session: SessionDep, workspace: WorkspaceDep) -> JobOut:
    """A job's state, stage, attempts, progress, error and result."""
    return job_out(owned_job(session, workspace, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={404: {"model": ErrorBody}})
def cancel_job(job_id: str, workspace: WriterWorkspaceDep) -> JobOut:
    """Cancel a job: a queued job never starts; a running one stops at its next checkpoint
    and leaves no partial data."""
    with session_scope() as session:
        kind = owned_job(session, workspace, job_id).kind
        ledger.cancel(session, job_id=job_id)
    dispatch_held(workspace, kind)  # a queued job's slot is free
    with session_scope() as session:
        return job_out(owned_job(session, workspace, job_id))


@router.get("", response_model=list[JobOut])
def list_jobs(
    session: SessionDep,
    workspace: WorkspaceDep,
    state: str | None = None,
    kind: str | None = None,
    parent: Annotated[str | None, Query(description="Only the parts of this job")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[JobOut]:
    """The workspace's jobs, newest first."""
    stmt = select(Job).where(Job.workspace_id == workspace)
    if parent is not None:
        stmt = stmt.where(Job.parent_id == parent)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    jobs = session.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit))
    return [job_out(job) for job in jobs]
