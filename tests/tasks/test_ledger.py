"""The job state machine on SQLite and on PostgreSQL: guarded transitions, attempts, retries."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from models import Job, JobAttempt, JobKind, JobState, Stage, ledger
from models.entities import utcnow
from sluice.db import session_scope


def _job() -> str:
    from api.deps import ensure_workspace

    with session_scope() as session:
        ensure_workspace(session, "ws")
        return ledger.create_job(session, workspace_id="ws", kind=JobKind.ANSWER,
                                 stage=Stage.ANSWER, payload={"question": "q"}).id


def _start(job_id: str, worker: str = "w1", stale_s: float = 60) -> ledger.Claim | None:
    with session_scope() as session:
        return ledger.start(session, job_id=job_id, stage=Stage.ANSWER, worker=worker,
                            stale_before=utcnow() - timedelta(seconds=stale_s))


def _state(job_id: str) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def test_duplicate_delivery_cannot_start_twice_or_after_success(any_db: dict[str, str]) -> None:
    job_id = _job()
    claim = _start(job_id)
    assert claim is not None and claim.attempt == 1
    assert _start(job_id, worker="w2") is None  # still running, heartbeat fresh
    with session_scope() as session:
        assert ledger.succeed(session, claim, result={"ok": True})
    assert _start(job_id, worker="w3") is None  # finished: a late delivery is a no-op
    with session_scope() as session:
        assert not ledger.succeed(session, claim, result={"again": True})
        assert not ledger.fail(session, claim, code="x", message="late failure")
    job = _state(job_id)
    assert (job.state, job.result, job.attempts_total) == (JobState.SUCCEEDED, {"ok": True}, 1)


def test_retries_then_dead_with_every_attempt_recorded(any_db: dict[str, str]) -> None:
    job_id = _job()
    states = []
    for _ in range(4):
        claim = _start(job_id)
        assert claim is not None
        with session_scope() as session:
            states.append(ledger.retry_or_bury(session, claim, max_retries=2, delay_s=0,
                                               code="database_unavailable", message="boom",
                                               traceback="Traceback ..."))
        if states[-1] == JobState.DEAD:
            break
    assert states == [JobState.RETRYING, JobState.RETRYING, JobState.DEAD]
    assert _start(job_id) is None
    with session_scope() as session:
        attempts = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                   .order_by(JobAttempt.attempt)).all()
        assert [a.attempt for a in attempts] == [1, 2, 3]
        assert [a.outcome for a in attempts] == ["retrying", "retrying", "dead"]
        assert all(a.traceback and a.ended_at for a in attempts)
    job = _state(job_id)
    assert (job.state, job.error_code) == (JobState.DEAD, "database_unavailable")
    with session_scope() as session:
        assert ledger.replay(session, job_id=job_id)
    claim = _start(job_id)
    assert claim is not None and claim.attempt == 1
    assert _state(job_id).replayed_at is not None


def test_stale_running_job_is_taken_over(any_db: dict[str, str]) -> None:
    job_id = _job()
    first = _start(job_id)
    assert first is not None
    # Heartbeat older than the stale threshold (0 s here): the next delivery takes over.
    second = _start(job_id, worker="w2", stale_s=-1)
    assert second is not None and second.attempt == 2
    with session_scope() as session:
        assert not ledger.heartbeat(session, first)  # the old holder learns it lost the job
        assert ledger.heartbeat(session, second)
        assert not ledger.succeed(session, first)
        lost = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id,
                                                        JobAttempt.attempt == 1)).one()
        assert (lost.outcome, lost.error_code) == ("lost", "worker_lost")


def test_cancel_queued_and_running(any_db: dict[str, str]) -> None:
    queued = _job()
    with session_scope() as session:
        assert ledger.cancel(session, job_id=queued) == JobState.CANCELLED
    assert _start(queued) is None

    running = _job()
    claim = _start(running)
    assert claim is not None
    with session_scope() as session:
        assert ledger.cancel(session, job_id=running) == JobState.RUNNING
        assert not ledger.heartbeat(session, claim)  # the checkpoint will see it
        assert ledger.acknowledge_cancel(session, claim)
    assert _state(running).state == JobState.CANCELLED


def test_reconciler_queries(any_db: dict[str, str]) -> None:
    job_id = _job()
    with session_scope() as session:
        due = ledger.jobs_needing_publish(session, queued_before=utcnow() + timedelta(seconds=1))
        assert job_id in [j.id for j in due]
        ledger.mark_published(session, job_id)
    with session_scope() as session:
        due = ledger.jobs_needing_publish(session, queued_before=utcnow() - timedelta(minutes=5))
        assert job_id not in [j.id for j in due]
    claim = _start(job_id)
    assert claim is not None
    with session_scope() as session:
        stale = ledger.stale_running(session, stale_before=utcnow() + timedelta(seconds=1))
        assert [j.id for j in stale] == [job_id]
        assert ledger.retry_or_bury(session, claim, max_retries=3, delay_s=0,
                                    code="worker_lost", message="gone") == JobState.RETRYING
