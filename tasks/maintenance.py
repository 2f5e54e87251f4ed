"""Housekeeping run by beat on the `maintenance` queue."""

from __future__ import annotations

import logging
from datetime import timedelta

from models import ledger
from models.entities import utcnow
from sluice.db import session_scope
from sluice.settings import get_settings
from tasks import names
from tasks.publish import publish
from tasks.runner import fail_running_attempt
from workers.app import app

log = logging.getLogger(__name__)


@app.task(name=names.RECONCILE_JOBS)
def reconcile_jobs() -> dict[str, int]:
    """Republish jobs whose message was lost; recover running jobs whose worker died.

    Safe to run twice at once: republishing a job that does have a message only produces a
    duplicate delivery, which the ledger's compare-and-set turns into a no-op."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        stale = [
            (job.id, job.stage, job.worker)
            for job in ledger.stale_running(
                session, stale_before=now - timedelta(seconds=settings.heartbeat_stale_s))
        ]
    recovered = sum(
        fail_running_attempt(job_id, stage=stage, code="worker_lost",
                             message=f"worker {worker} stopped heartbeating during {stage}")
        is not None
        for job_id, stage, worker in stale
    )
    with session_scope() as session:
        due = [
            (job.id, job.stage)
            for job in ledger.jobs_needing_publish(
                session, queued_before=now - timedelta(seconds=settings.queued_republish_after_s)
            )
        ]
    republished = sum(publish(job_id, stage) for job_id, stage in due)
    if recovered or republished:
        log.info("reconciler: %d stale jobs recovered, %d republished", recovered, republished)
    return {"recovered": recovered, "republished": republished}
