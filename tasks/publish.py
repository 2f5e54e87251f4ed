"""Publishing a job's next message, always after the transaction that queued it commits.

Each message carries the job's request id as a header (`request_id`), so the worker that runs
it logs with the id of the HTTP request that started the job (see `sluice.logs`)."""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from models import Job, ledger
from sluice.db import read_scope, session_scope
from sluice.logs import current_context
from tasks.names import TASK_OF_STAGE
from workers.app import app

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "request_id"


def publish(job_id: str, stage: str, *, countdown: float | None = None,
            request_id: str | None = None) -> bool:
    """Send the task for `stage` of job `job_id`. A failure is logged, not raised: the job
    stays queued in the database and the reconciler republishes it. `request_id` defaults to
    the job's own (stored on its row when the job was created)."""
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
