"""The system-state module: queue depth from the ledger, readiness's cached worker probe."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from api.deps import ensure_workspace
from models import Job, JobKind, Stage, ledger
from models.entities import utcnow
from sluice import status
from sluice.db import read_scope, session_scope


def _job(stage: Stage = Stage.PARSE, kind: JobKind = JobKind.INGEST) -> str:
    with session_scope() as session:
        ensure_workspace(session, "default")
        return ledger.create_job(session, workspace_id="default", kind=kind, stage=stage).id


def test_queue_stats_and_running_jobs_from_the_ledger(any_db: dict[str, str]) -> None:
    waiting = [_job(), _job()]
    running, retrying, dead = _job(Stage.EMBED), _job(Stage.ANSWER, JobKind.ANSWER), _job()
    with session_scope() as session:
        assert ledger.start(session, job_id=running, stage=Stage.EMBED, worker="w1@h",
                            stale_before=utcnow())
        claim = ledger.start(session, job_id=retrying, stage=Stage.ANSWER, worker="w1@h",
                             stale_before=utcnow())
        assert claim and ledger.retry_or_bury(session, claim, max_retries=3, delay_s=0,
                                              code="connection_error", message="x")
        claim = ledger.start(session, job_id=dead, stage=Stage.PARSE, worker="w1@h",
                             stale_before=utcnow())
        assert claim and ledger.retry_or_bury(session, claim, max_retries=0, delay_s=0,
                                              code="connection_error", message="x")
        # a republish moves updated_at; the wait is counted from when it was queued
        session.execute(update(Job).where(Job.id == waiting[0])
                        .values(updated_at=utcnow() + timedelta(minutes=5)))

    now = utcnow() + timedelta(seconds=1)
    with read_scope() as session:
        stats = status.queue_stats(session, now=now)
        jobs, total = status.running_jobs(session, now=now, answering={"w1@h"})
        dead_letters = status.dead_letter_count(session)
    assert set(stats) == {"parse", "embed", "answer", "maintenance"}
    parse, embed, answer = stats["parse"], stats["embed"], stats["answer"]
    assert (parse.queued, parse.depth, parse.running) == (2, 2, 0)
    assert parse.oldest_queued_age_s is not None and parse.oldest_queued_age_s >= 1
    assert (embed.running, embed.depth, embed.oldest_queued_age_s) == (1, 0, None)
    assert (answer.retrying, answer.depth) == (1, 1)
    assert answer.oldest_queued_age_s is not None and answer.oldest_queued_age_s > 0
    assert stats["maintenance"].depth == 0
    assert total == 1 and [(j.job_id, j.stage, j.worker, j.worker_answering)
                           for j in jobs] == [(running, "embed", "w1@h", True)]
    assert dead_letters == 1


def test_database_check_and_cached_worker_probe(sluice_env: dict[str, str]) -> None:
    db = status.check_database()
    assert db.ok and db.revision == db.head is not None

    # The real broadcast over the embedded broker, with no worker running.
    probe = status.CachedWorkerProbe(ttl_s=60, timeout=0.2)
    first = probe.observe()
    assert first.broker.ok and first.workers == {}
    assert probe.observe() is first  # cached: no second broadcast
    ready = status.readiness(probe)
    assert not ready.ready and ready.database.ok
    assert all(not q.ready and q.workers == [] for q in ready.queues.values())
    assert status.CachedWorkerProbe(ttl_s=0, timeout=0.2).observe() is not first
