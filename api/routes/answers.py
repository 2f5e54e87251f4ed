"""Questions: answered by a job on the `answer` queue; search: synchronous retrieval."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from api import ratelimit
from api.deps import SessionDep, WorkspaceDep, default_quota, ensure_workspace
from api.routes.jobs import job_out
from api.schemas import (
    AnswerRequest,
    ErrorBody,
    JobAccepted,
    JobOut,
    SearchHit,
    SearchRequest,
    SearchResults,
)
from api.state import dispatch_held, publish_job, query_encoder
from models import Job, JobKind, Stage, fairness, ledger, quotas
from models.entities import FINAL_STATES
from sluice.db import read_scope, session_scope
from sluice.logs import bind_context, current_request_id
from sluice.retrieve import hybrid_search
from sluice.settings import get_settings

router = APIRouter(prefix="/v1", tags=["answers"])
log = logging.getLogger(__name__)

POLL_S = 0.05


@router.post("/answers", status_code=202, response_model=JobAccepted | JobOut,
             responses={200: {"model": JobOut}, 429: {"model": ErrorBody}})
async def ask(
    body: AnswerRequest,
    workspace: WorkspaceDep,
    response: Response,
    wait: Annotated[float, Query(ge=0, le=120, description="Seconds to wait for the answer")] = 0,
) -> JobAccepted | JobOut:
    """Ask a question over the workspace's documents. Returns `202 {"job_id"}`; with
    `?wait=SECONDS` it waits up to that long and returns the finished job (`200`), whose
    `result` holds `{"answer", "citations": [...], "answered"}`."""
    await run_in_threadpool(_count_answer, workspace)
    job_id, room = await run_in_threadpool(_create_answer_job, workspace, body)
    bind_context(job_id=job_id)
    cap = get_settings().workspace_answer_inflight_cap
    if room.admits(cap):
        log.info("question queued as job %s", job_id)
        # (marked published with its creation)
        await run_in_threadpool(publish_job, job_id, Stage.ANSWER, mark=False)
    else:
        log.info("question queued as job %s, held: the workspace has %d questions in flight "
                 "(cap %s)", job_id, room.in_flight, cap)
        if room.frees(cap):  # older questions were held although there is room
            await run_in_threadpool(dispatch_held, workspace, JobKind.ANSWER)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    if wait > 0:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            finished = await run_in_threadpool(_finished_job, job_id)
            if finished is not None:
                response.status_code = 200
                return finished
            await asyncio.sleep(POLL_S)
    return JobAccepted(job_id=job_id)


def _count_answer(workspace: str) -> None:
    """The workspace's answers-per-minute quota, a moving window (429 over it)."""
    with read_scope() as session:
        per_minute = quotas.effective_quota(session, workspace_id=workspace,
                                            defaults=default_quota()).answers_per_minute
    if per_minute is None:
        return
    wait = ratelimit.hit(ratelimit.per_minute(per_minute), "answers", workspace)
    if wait is not None:
        raise quotas.QuotaExceeded(
            status=429, code="answer_quota_exceeded", retry_after_s=wait,
            message=f"the workspace may ask {per_minute} questions a minute; retry in {wait} s")


def _create_answer_job(workspace: str, body: AnswerRequest) -> tuple[str, fairness.Room]:
    """The question's job, held when the workspace has as many questions in flight as
    `SLUICE_WORKSPACE_ANSWER_INFLIGHT_CAP` (see `_record_upload` of documents)."""
    settings = get_settings()
    with session_scope() as session:
        ensure_workspace(session, workspace)
        quotas.lock_workspace(session, workspace_id=workspace)
        quota = quotas.effective_quota(session, workspace_id=workspace,
                                       defaults=default_quota(settings))
        quotas.check_job(session, workspace_id=workspace, quota=quota,
                         retry_after_s=settings.quota_retry_after_s)
        room = fairness.admit(session, workspace_id=workspace, lane=fairness.ANSWER)
        admitted = room.admits(settings.workspace_answer_inflight_cap)
        job = ledger.NewJob(workspace_id=workspace, kind=JobKind.ANSWER, stage=Stage.ANSWER,
                            request_id=current_request_id(),
                            payload={"question": body.question, "top_k": body.top_k},
                            held=not admitted, published=admitted)
        ledger.insert_jobs(session, [job])
        return job.id, room


def _finished_job(job_id: str) -> JobOut | None:
    with read_scope() as session:
        job = session.get(Job, job_id)
        if job is not None and job.state in FINAL_STATES:
            return job_out(job)
    return None


@router.post("/search", response_model=SearchResults, tags=["search"])
def search(body: SearchRequest, session: SessionDep, workspace: WorkspaceDep) -> SearchResults:
    """Ranked passages of the workspace's ready documents (dense + full-text, fused)."""
    encoder = query_encoder()
    passages = hybrid_search(
        session, workspace_id=workspace, query=body.query, encode_query=encoder.encode_one,
        top_k=body.top_k, candidates=get_settings().search_candidates, mode=body.mode,
        embedding_version=encoder.model_version,
    )
    return SearchResults(
        query=body.query,
        results=[SearchHit(chunk_id=p.chunk_id, document_id=p.document_id, filename=p.filename,
                           page=p.page, text=p.text, score=p.score) for p in passages],
    )
