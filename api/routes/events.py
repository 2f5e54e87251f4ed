"""Job event streams (Server-Sent Events). Events are rows the ledger appends in the same
transaction as each change, so a stream sees every transition of every worker process, in
order, and can resume with `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from api.deps import WORKSPACE_RE, WorkspaceDep
from api.errors import ApiError
from api.routes.jobs import owned_job
from api.schemas import ErrorBody, as_utc
from models import JobEvent
from models.entities import FINAL_STATES
from sluice.db import read_scope

router = APIRouter(tags=["events"])

POLL_S = 0.2
KEEPALIVE_S = 15.0
BATCH = 500


def _format(event: JobEvent) -> str:
    data = {
        "job_id": event.job_id, "kind": event.kind, "state": event.state,
        "stage": event.stage, "progress": event.progress,
        "error": {"code": event.error_code, "message": event.error_message or ""}
        if event.error_code else None,
        "at": as_utc(event.created_at).isoformat(),
    }
    return f"id: {event.id}\nevent: job\ndata: {json.dumps(data)}\n\n"


def _fetch(*, workspace: str, job_id: str | None, after: int) -> list[JobEvent]:
    with read_scope() as session:
        stmt = select(JobEvent).where(JobEvent.workspace_id == workspace, JobEvent.id > after)
        if job_id is not None:
            stmt = stmt.where(JobEvent.job_id == job_id)
        return list(session.scalars(stmt.order_by(JobEvent.id).limit(BATCH)))


def _latest_id(workspace: str) -> int:
    with read_scope() as session:
        return int(session.scalar(select(func.max(JobEvent.id))
                                  .where(JobEvent.workspace_id == workspace)) or 0)


async def _stream(request: Request, *, workspace: str, job_id: str | None,
                  after: int) -> AsyncIterator[str]:
    last_sent = time.monotonic()
    while True:
        events = await run_in_threadpool(_fetch, workspace=workspace, job_id=job_id, after=after)
        for event in events:
            after = event.id
            yield _format(event)
            last_sent = time.monotonic()
            if job_id is not None and event.state in FINAL_STATES:
                return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if len(events) < BATCH:
            await asyncio.sleep(POLL_S)


def _sse(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_owned(workspace: str, job_id: str) -> None:
    with read_scope() as session:
        owned_job(session, workspace, job_id)


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       404: {"model": ErrorBody}})
async def job_events(
    job_id: str,
    request: Request,
    workspace: WorkspaceDep,
    last_event_id: Annotated[int, Header(ge=0, le=2**63 - 1)] = 0,
) -> StreamingResponse:
    """The job's changes as Server-Sent Events (`state`, `stage`, `progress`, `error`), from its
    creation (or after `Last-Event-ID`); the stream ends when the job ends. No database session
    is held between polls."""
    await run_in_threadpool(_check_owned, workspace, job_id)
    return _sse(_stream(request, workspace=workspace, job_id=job_id, after=last_event_id))


@router.get("/v1/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def workspace_events(
    request: Request,
    header_workspace: WorkspaceDep,
    workspace: Annotated[str | None, Query(
        description="defaults to the caller's own, the only one allowed")] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=2**63 - 1)] = None,
) -> StreamingResponse:
    """Every job change in the workspace from now on (or after `Last-Event-ID`)."""
    if workspace is not None and workspace != header_workspace:
        if not WORKSPACE_RE.match(workspace):
            raise ApiError(400, "invalid_workspace", "invalid workspace")
        raise ApiError(403, "forbidden", "a stream can only follow the request's own workspace")
    after = last_event_id if last_event_id is not None else await run_in_threadpool(
        _latest_id, header_workspace)
    return _sse(_stream(request, workspace=header_workspace, job_id=None, after=after))
