"""Housekeeping run by beat on the `maintenance` queue.

Every task here runs under its lease (`tasks.periodic.run_exclusive`): a second beat, or a
duplicate or late message, finds the lease taken and skips. Each is idempotent as well, so a
run that lost its lease midway (its worker stalled past the lease) repeats no harm. A lease
outlives its task's hard time limit (celeryconfig) and is renewed between units of work, so
it expires only when its holder died (SIGKILL, lost machine: anything else releases it). The
reconciler's is the exception: overlapping runs are harmless for it, and it is what recovers
from dead workers, so its lease is short and a killed holder delays it by 30 s at most.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from models import ledger, locks
from models.entities import utcnow
from sluice.db import read_scope, session_scope
from sluice.settings import get_settings
from tasks import digest, names, reembed, retention
from tasks.periodic import Exclusive, Result, run_exclusive
from tasks.publish import dispatch_everywhere, publish
from tasks.runner import fail_running_attempt
from workers import resources
from workers.app import app

log = logging.getLogger(__name__)

LEASE_TTL_S = {
    names.RECONCILE_JOBS: 30.0,
    names.PURGE_EXPIRED: 360.0,
    names.REEMBED_OUTDATED: 660.0,
    names.DEAD_LETTER_DIGEST: 120.0,
}
RECONCILE_KEEP_EVERY = 50  # jobs handled between two renewals of the reconciler's lease
RECONCILE_DISPATCH_LIMIT = 500  # held jobs dispatched per run, at most (shared round-robin)


@app.task(name=names.RECONCILE_JOBS)
def reconcile_jobs() -> Result:
    """Republish jobs whose message was lost; recover running jobs whose worker died; dispatch
    held jobs of workspaces with free slots (a dispatch after a job's end may have been missed).

    Safe even without its lease: republishing a job that does have a message only produces a
    duplicate delivery, which the ledger's compare-and-set turns into a no-op, and a dispatch
    takes its slots under the workspace's lock."""
    return run_exclusive(names.RECONCILE_JOBS, ttl_s=LEASE_TTL_S[names.RECONCILE_JOBS],
                         work=_reconcile)


def _reconcile(held: Exclusive) -> Result:
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        stale = [
            (job.id, job.stage, job.worker)
            for job in ledger.stale_running(
                session, stale_before=now - timedelta(seconds=settings.heartbeat_stale_s))
        ]
    recovered = 0
    for i, (job_id, stage, worker) in enumerate(stale, start=1):
        recovered += fail_running_attempt(
            job_id, stage=stage, code="worker_lost",
            message=f"worker {worker} stopped heartbeating during {stage}") is not None
        if i % RECONCILE_KEEP_EVERY == 0:
            held.keep()
    with session_scope() as session:
        due = [
            (job.id, job.stage)
            for job in ledger.jobs_needing_publish(
                session, queued_before=now - timedelta(seconds=settings.queued_republish_after_s)
            )
        ]
    republished = 0
    for i, (job_id, stage) in enumerate(due, start=1):
        republished += publish(job_id, stage)
        if i % RECONCILE_KEEP_EVERY == 0:
            held.keep()
    held.keep()
    dispatched = dispatch_everywhere(limit=RECONCILE_DISPATCH_LIMIT)
    if recovered or republished or dispatched:
        log.info("reconciler: %d stale jobs recovered, %d republished, %d held jobs dispatched",
                 recovered, republished, dispatched)
    return {"recovered": recovered, "republished": republished, "dispatched": dispatched}


@app.task(name=names.PURGE_EXPIRED)
def purge_expired() -> Result:
    """Delete expired finished jobs, idempotency records and orphaned blobs (see
    `tasks.retention`)."""
    return run_exclusive(
        names.PURGE_EXPIRED, ttl_s=LEASE_TTL_S[names.PURGE_EXPIRED],
        work=lambda held: retention.purge_expired(
            settings=get_settings(), blobs=resources.blob_store(), keep=held.keep),
    )


@app.task(name=names.REEMBED_OUTDATED)
def reembed_outdated_chunks() -> Result:
    """Re-embed, a batch of whole documents per run, the chunks whose vectors are of another
    model version than the configured one (see `tasks.reembed`)."""
    return run_exclusive(
        names.REEMBED_OUTDATED, ttl_s=LEASE_TTL_S[names.REEMBED_OUTDATED],
        work=lambda held: reembed.reembed_outdated(
            embedder=resources.embedder(), max_chunks=get_settings().reembed_chunks_per_run,
            keep=held.keep),
    )


@app.task(name=names.DEAD_LETTER_DIGEST)
def dead_letter_digest() -> Result:
    """Log (and optionally post) a digest of the dead-letter store (see `tasks.digest`)."""
    return run_exclusive(names.DEAD_LETTER_DIGEST, ttl_s=LEASE_TTL_S[names.DEAD_LETTER_DIGEST],
                         work=_digest)


def _digest(_held: Exclusive) -> Result:
    settings = get_settings()
    with read_scope() as session:
        since = digest.parse_as_of(locks.last_result(session, names.DEAD_LETTER_DIGEST))
    return digest.report(digest.summarize(since=since),
                         webhook_url=settings.dead_letter_webhook_url,
                         timeout_s=settings.dead_letter_webhook_timeout_s)
