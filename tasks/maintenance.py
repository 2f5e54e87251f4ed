"""Housekeeping run by beat on the `maintenance` queue."""

from __future__ import annotations

import logging
from datetime import timedelta

from models import JobState, documents, ledger
from models.entities import utcnow
from sluice.db import session_scope
from sluice.settings import get_settings
from tasks import names
from tasks.publish import publish
from workers.app import app

log = logging.getLogger(__name__)


@app.task(name=names.RECONCILE_JOBS)
def reconcile_jobs() -> dict[str, int]:
    """Republish jobs whose message was lost; recover running jobs whose worker died.

    Safe to run twice at once: republishing a job that does have a message only produces a
    duplicate delivery, which the ledger's compare-and-set turns into a no-op."""
    settings = get_settings()
    now = utcnow()
    recovered: list[tuple[str, str]] = []
    with session_scope() as session:
        for job in ledger.stale_running(
            session, stale_before=now - timedelta(seconds=settings.heartbeat_stale_s)
        ):
            queue = names.QUEUE_OF_TASK[names.TASK_OF_STAGE[job.stage]]
            message = f"worker {job.worker} stopped heartbeating during {job.stage}"
            state = ledger.recover_stale(
                session, job=job, max_retries=settings.retry_policy(queue).max_retries,
                code="worker_lost", message=message,
            )
            if state == JobState.RETRYING:
                recovered.append((job.id, job.stage))
            elif state == JobState.DEAD and job.document_id is not None:
                documents.mark_failed(session, document_id=job.document_id,
                                      code="worker_lost", message=message)
    with session_scope() as session:
        due = [
            (job.id, job.stage)
            for job in ledger.jobs_needing_publish(
                session, queued_before=now - timedelta(seconds=settings.queued_republish_after_s)
            )
        ]
    republished = sum(publish(job_id, stage) for job_id, stage in [*recovered, *due])
    if recovered or republished:
        log.info("reconciler: %d stale jobs recovered, %d republished", len(recovered),
                 republished)
    return {"recovered": len(recovered), "republished": republished}
