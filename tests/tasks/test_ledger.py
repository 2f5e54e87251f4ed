"""The job state machine on SQLite and on PostgreSQL: guarded transitions, attempts, retries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from models import Job, JobAttempt, JobKind, JobState, Stage, ledger
from models.entities import utcnow
from models.fairness import ANSWER, HAS_HELD, INGEST
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


# --- The claim and the success at once (on PostgreSQL, one statement each) -----------------------


Rows = tuple[dict[str, object], list[tuple[object, ...]], list[tuple[object, ...]]]


def _rows(job_id: str) -> Rows:
    """A job's row (the columns a transition writes, times as set or not), its events and its
    attempts, comparable between two jobs."""
    from models import JobEvent

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        row = {c: getattr(job, c) for c in ("state", "stage", "attempt", "attempts_total",
                                            "worker", "progress", "result", "error_code",
                                            "error_message", "retry_at")}
        row |= {c: getattr(job, c) is not None for c in ("started_at", "heartbeat_at",
                                                         "finished_at")}
        events = [tuple(e) for e in session.execute(
            select(JobEvent.workspace_id, JobEvent.kind, JobEvent.state, JobEvent.stage,
                   JobEvent.progress, JobEvent.error_code, JobEvent.error_message)
            .where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
        attempts = [tuple(a) for a in session.execute(
            select(JobAttempt.stage, JobAttempt.attempt, JobAttempt.worker, JobAttempt.outcome,
                   JobAttempt.error_code, JobAttempt.ended_at.is_not(None))
            .where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt))]
    return row, events, attempts


def test_claim_and_success_at_once_write_what_start_and_succeed_do(
    any_db: dict[str, str],
) -> None:
    from sluice.db import transition_scope

    by_transactions, at_once = _job(), _job()
    claim = _start(by_transactions)
    assert claim is not None
    with session_scope() as session:
        assert ledger.succeed(session, claim, result=None)
    with transition_scope() as conn:
        fast = ledger.claim_at_once(conn, job_id=at_once, stage=Stage.ANSWER, worker="w1")
        assert fast is not None and (fast.attempt, fast.parent_id, fast.parent_known) == (
            1, None, True)
        assert (fast.job.workspace_id, fast.job.kind, fast.job.payload) == (
            "ws", JobKind.ANSWER, {"question": "q"})
        assert ledger.succeed_at_once(conn, fast, result=None, workspace_id="ws",
                                      held=HAS_HELD[ANSWER]) == (True, False)
    assert _rows(at_once) == _rows(by_transactions)
    with session_scope() as session:  # None is SQL NULL, as the ORM update writes it
        assert session.scalar(select(Job.id).where(Job.id == at_once, Job.result.is_(None)))


def test_claim_and_success_at_once_refuse_what_start_and_succeed_refuse(
    any_db: dict[str, str],
) -> None:
    from sluice.db import transition_scope

    job_id = _job()
    with transition_scope() as conn:
        claim = ledger.claim_at_once(conn, job_id=job_id, stage=Stage.ANSWER, worker="w1")
        assert claim is not None
        # running with a fresh heartbeat, or at another stage: not claimable
        assert ledger.claim_at_once(conn, job_id=job_id, stage=Stage.ANSWER, worker="w2") is None
        assert ledger.claim_at_once(conn, job_id=job_id, stage=Stage.PARSE, worker="w2") is None
        assert ledger.succeed_at_once(conn, claim, result={"ok": 1}, workspace_id="ws",
                                      held=HAS_HELD[ANSWER])[0]
        # a late duplicate of the success, then of the delivery
        assert ledger.succeed_at_once(conn, claim, result={"ok": 2}, workspace_id="ws",
                                      held=HAS_HELD[ANSWER]) == (False, False)
        assert ledger.claim_at_once(conn, job_id=job_id, stage=Stage.ANSWER, worker="w3") is None
    row, events, attempts = _rows(job_id)
    assert (row["state"], row["result"], row["attempts_total"]) == (
        JobState.SUCCEEDED, {"ok": 1}, 1)
    assert [e[2] for e in events] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert attempts == [(Stage.ANSWER, 1, "w1", "succeeded", None, True)]

    # a job asked to cancel, and a held one, are left to `start`
    cancelled, held = _job(), _job()
    with session_scope() as session:
        ledger.cancel(session, job_id=cancelled)
        session.execute(update(Job).where(Job.id == held).values(held=True))
    with transition_scope() as conn:
        for job_id in (cancelled, held):
            assert ledger.claim_at_once(conn, job_id=job_id, stage=Stage.ANSWER, worker="w") is None


def test_success_at_once_reads_held_jobs_of_its_lane_and_workspace(
    any_db: dict[str, str],
) -> None:
    from sluice.db import transition_scope

    first, second, waiting = _job(), _job(), _job()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == waiting).values(held=True))
    with transition_scope() as conn:
        claims = [ledger.claim_at_once(conn, job_id=j, stage=Stage.ANSWER, worker="w")
                  for j in (first, second)]
        assert all(claims)
        # an ANSWER job is held in this workspace: seen in its own lane, not in another
        assert ledger.succeed_at_once(conn, claims[0], result=None, workspace_id="ws",
                                      held=HAS_HELD[INGEST]) == (True, False)
        assert ledger.succeed_at_once(conn, claims[1], result=None, workspace_id="ws",
                                      held=HAS_HELD[ANSWER]) == (True, True)
    part = ledger.Claim(job_id=first, stage=Stage.ANSWER, attempt=1, parent_id="p",
                        parent_known=True)
    with transition_scope() as conn, pytest.raises(ValueError, match="part"):
        ledger.succeed_at_once(conn, part, result=None, workspace_id="ws",
                               held=HAS_HELD[ANSWER])


def test_a_job_that_only_succeeds_costs_the_runner_two_statements_on_postgres(
    pg_env: dict[str, str],
) -> None:
    from sqlalchemy import event

    from sluice.db import get_engine
    from tasks.runner import run_stage

    job_id = _job()
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        outcome = run_stage(job_id=job_id, stage=Stage.ANSWER, worker="w1",
                            work=lambda ctx: ctx.succeed({"answer": 42}))
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    assert outcome == JobState.SUCCEEDED
    assert [s.split(None, 3)[:3] for s in statements] == [
        ["WITH", "claimed", "AS"], ["WITH", "succeeded", "AS"]]
    row, events, attempts = _rows(job_id)
    assert (row["state"], row["result"]) == (JobState.SUCCEEDED, {"answer": 42})
    assert [e[2] for e in events] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert attempts == [(Stage.ANSWER, 1, "w1", "succeeded", None, True)]
