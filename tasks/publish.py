"""Publishing a job's next message, always after the transaction that queued it commits."""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError as BrokerError

from models import ledger
from sluice.db import session_scope
from tasks.names import TASK_OF_STAGE
from workers.app import app

log = logging.getLogger(__name__)


def publish(job_id: str, stage: str, *, countdown: float | None = None) -> bool:
    """Send the task for `stage` of job `job_id`. A failure is logged, not raised: the job
    stays queued in the database and the reconciler republishes it."""
    try:
        app.send_task(
            TASK_OF_STAGE[stage],
            args=[job_id],
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except (BrokerError, OSError) as exc:
        log.warning("publish of job %s (%s) failed, the reconciler will retry: %s",
                    job_id, stage, exc)
        return False
    with session_scope() as session:
        ledger.mark_published(session, job_id)
    return True
