"""The heartbeat of running jobs: one thread per process beats for each, every interval."""

from __future__ import annotations

import threading
import time

import pytest

from models import Job, JobKind, JobState, Stage, ledger
from sluice.db import session_scope
from tasks.runner import Handoff, StageContext, _HeartbeatThread, run_stage


def _job(workspace: str = "ws-hb") -> str:
    from api.deps import ensure_workspace

    with session_scope() as session:
        ensure_workspace(session, workspace)
        return ledger.create_job(session, workspace_id=workspace, kind=JobKind.ANSWER,
                                 stage=Stage.ANSWER).id


@pytest.fixture
def fast_heartbeat(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_HEARTBEAT_INTERVAL_S", "0.1")
    get_settings.cache_clear()


def test_concurrent_jobs_share_one_heartbeat_thread_and_each_beats(
    fast_heartbeat: None,
) -> None:
    beats: dict[str, list[object]] = {}
    both_running = threading.Barrier(2, timeout=10)

    def work(ctx: StageContext) -> Handoff:
        both_running.wait()
        seen = []
        for _ in range(6):
            time.sleep(0.1)
            with session_scope() as session:
                seen.append(session.get_one(Job, ctx.claim.job_id).heartbeat_at)
        beats[ctx.claim.job_id] = seen
        return ctx.finish(lambda session: ledger.succeed(session, ctx.claim))

    jobs = [_job(), _job()]
    threads = [threading.Thread(target=run_stage, kwargs={
        "job_id": j, "stage": Stage.ANSWER, "work": work}) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [t for t in threading.enumerate() if t.name == "heartbeats"] == \
        [_HeartbeatThread.of_this_process()]
    for job_id in jobs:
        assert len(set(beats[job_id])) >= 3, beats[job_id]  # refreshed while it worked
        with session_scope() as session:
            assert session.get_one(Job, job_id).state == JobState.SUCCEEDED
    assert not _HeartbeatThread.of_this_process().beats  # both removed when they ended


def test_a_cancel_seen_by_the_heartbeat_stops_the_job_at_its_checkpoint(
    fast_heartbeat: None,
) -> None:
    job_id = _job()

    def work(ctx: StageContext) -> Handoff:
        with session_scope() as session:
            ledger.cancel(session, job_id=job_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.checkpoint()
            time.sleep(0.05)
        raise AssertionError("the heartbeat never saw the cancel")

    assert run_stage(job_id=job_id, stage=Stage.ANSWER, work=work) == JobState.CANCELLED
