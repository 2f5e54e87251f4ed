"""Publishing a job's next message, always after the transaction that queued it commits.

Each message carries the job's request id as a header (`request_id`), so the worker that runs
it logs with the id of the HTTP request that started the job (see `sluice.logs`).

`dispatch` publishes a workspace's held jobs within its in-flight cap (`models.fairness`),
after a commit that may have freed a slot; `dispatch_everywhere` does it for every workspace
(the reconciler)."""

from __future__ import annotations

import logging
from itertools import chain, zip_longest

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from models import Job, fairness, ledger
from sluice.db import read_scope, session_scope
from sluice.logs import current_context
from sluice.settings import get_settings
from tasks.names import TASK_OF_STAGE
from workers.app import app

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "request_id"


def publish(job_id: str, stage: str, *, countdown: float | None = None,
            request_id: str | None = None, mark: bool = True) -> bool:
    """Send the task for `stage` of job `job_id`. A failure is logged, not raised: the job
    stays queued in the database and the reconciler republishes it. `request_id` defaults to
    the job's own (stored on its row when the job was created). `mark=False`: its
    `published_at` was set already (a dispatch sets it with the job's release from hold)."""
    request_id = request_id or job_request_id(job_id)
    try:
        app.send_task(
            TASK_OF_STAGE[stage],
            args=[job_id],
            countdown=countdown,
            headers={REQUEST_ID_HEADER: request_id} if request_id else None,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except (BrokerError, OSError) as exc:
        log.warning("publish of job %s (%s) failed, the reconciler will retry: %s",
                    job_id, stage, exc)
        return False
    if mark:
        with session_scope() as session:
            ledger.mark_published(session, job_id)
    # (the stage in the line's context stays the one of the task that published, if any)
    log.info("job %s: %s published", job_id, stage,
             extra={"job_id": job_id, "request_id": request_id})
    return True


def job_request_id(job_id: str) -> str | None:
    """The request id of job `job_id`: from the log context when this is a task of that job
    (the header it arrived with), else from its row (the API, the reconciler, a replay)."""
    context = current_context()
    if context.get("job_id") == job_id:
        return context.get("request_id")
    try:
        with read_scope() as session:
            return session.scalar(select(Job.request_id).where(Job.id == job_id))
    except DBAPIError as exc:  # the message still goes out; only its log correlation is lost
        log.warning("request id of job %s unavailable: %s", job_id, exc)
        return None


def dispatch(workspace_id: str, kind: str, *, held: bool | None = None) -> int:
    """Publish the oldest held jobs of `workspace_id` in the lane of `kind`, as many as it has
    free slots. Call it after a commit that may have freed one (a job of the lane ended, was
    cancelled, split into held parts, or jobs were replayed held); `held`: whether jobs were
    held, if that commit's transaction read it (`fairness.has_held`), else it is read here.
    Never raises: a dispatch missed here is made by the reconciler. Returns how many were
    published."""
    lane = fairness.lane_of(kind)
    try:
        if held is None:
            with read_scope() as session:
                held = fairness.has_held(session, workspace_id=workspace_id, lane=lane)
        if not held:
            return 0
        with session_scope() as session:
            taken = fairness.dispatch(session, workspace_id=workspace_id, lane=lane,
                                      cap=get_settings().inflight_cap(lane))
    except DBAPIError as exc:
        log.warning("dispatch of held %s jobs of workspace %s failed, the reconciler will "
                    "retry: %s", lane, workspace_id, exc)
        return 0
    return _publish_all(taken)


def dispatch_everywhere(*, limit: int) -> int:
    """The reconciler's part: dispatch the held jobs of every workspace with free slots, at
    most `limit` in all, shared round-robin (one job per workspace per round, then published
    interleaved), so no workspace's backlog goes before another's."""
    settings = get_settings()
    published = 0
    budget = limit
    for lane in fairness.LANES:
        cap = settings.inflight_cap(lane)
        with read_scope() as session:
            free = {ws: fairness.free_slots(session, workspace_id=ws, lane=lane, cap=cap)
                    for ws in fairness.workspaces_with_held(session, lane=lane)}
        shares = round_robin({ws: limit if n is None else n for ws, n in free.items()},
                             budget=budget)
        taken: list[list[ledger.Dispatch]] = []
        for workspace_id, share in shares.items():
            if share:
                with session_scope() as session:
                    taken.append(fairness.dispatch(session, workspace_id=workspace_id,
                                                   lane=lane, cap=cap, limit=share))
        interleaved = [d for d in chain.from_iterable(zip_longest(*taken)) if d is not None]
        budget -= len(interleaved)
        published += _publish_all(interleaved)
    return published


def round_robin(free: dict[str, int], *, budget: int) -> dict[str, int]:
    """Share `budget` slots among workspaces one at a time in turn, each up to its `free`."""
    shares = dict.fromkeys(free, 0)
    while budget > 0:
        open_ = [ws for ws in free if shares[ws] < free[ws]]
        if not open_:
            break
        for ws in open_[:budget]:
            shares[ws] += 1
        budget -= min(budget, len(open_))
    return shares


def _publish_all(taken: list[ledger.Dispatch]) -> int:
    return sum(publish(d.job_id, d.stage, request_id=d.request_id, mark=False) for d in taken)
