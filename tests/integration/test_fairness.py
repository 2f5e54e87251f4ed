"""Fairness through the real API and real Celery worker processes: a workspace that floods
documents cannot starve another workspace's single upload, never has more jobs in flight than
its cap, and every one of its documents still succeeds; a held job whose dispatch was missed
(its worker killed between commit and dispatch) is dispatched by the reconciler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.deps import ensure_workspace
from models import Job, JobKind, JobState, Stage, fairness, ledger
from sluice.db import session_scope
from tests.faults.harness import make_corpus
from tests.stack import StackFactory

pytestmark = pytest.mark.integration

CAP = 2
FLOOD = 60


@pytest.fixture(params=["embedded", "postgres+redis"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    name = "sluice_env" if request.param == "embedded" else "production_env"
    result: dict[str, str] = request.getfixturevalue(name)
    return {**result, "SLUICE_WORKSPACE_INFLIGHT_CAP": str(CAP),
            "SLUICE_WORKSPACE_ANSWER_INFLIGHT_CAP": str(CAP),
            "SLUICE_RECONCILE_INTERVAL_S": "1"}


class InFlightWatch(threading.Thread):
    """The most jobs of one workspace's ingest lane seen in flight at once."""

    def __init__(self, workspace: str) -> None:
        super().__init__(daemon=True)
        self.workspace = workspace
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.05):
            with session_scope() as session:
                room = fairness.room(session, workspace_id=self.workspace,
                                     lane=fairness.INGEST)
            self.peak = max(self.peak, room.in_flight)


def _succeeded(job_ids: list[str]) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.id.in_(job_ids), Job.state == JobState.SUCCEEDED)) or 0


def test_a_flood_cannot_starve_another_workspace(
    env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    s = stack(env, workers=1, concurrency=2, beat=True)
    files = make_corpus(tmp_path / "corpus", FLOOD + 1)
    watch = InFlightWatch("a")
    watch.start()
    flood = [s.upload(f, workspace="a").json()["job_id"] for f in files[:FLOOD]]
    single = s.upload(files[FLOOD], workspace="b").json()["job_id"]

    b_done = s.wait_jobs([single], workspace="b", timeout=300)[single]
    a_done_then = _succeeded(flood)
    print(f"b's document succeeded when {a_done_then} of a's {FLOOD} had")
    assert b_done["state"] == "succeeded", b_done
    assert a_done_then < FLOOD // 2, (
        f"b's one document waited for {a_done_then} of a's {FLOOD}")

    states = s.wait_jobs(flood, workspace="a", timeout=900)
    watch.stop_event.set()
    watch.join()
    assert sorted({j["state"] for j in states.values()}) == ["succeeded"]  # none stranded
    assert watch.peak <= CAP, watch.peak
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.held.is_(True), Job.state == JobState.QUEUED)) == 0


def test_a_held_job_whose_dispatch_was_missed_is_dispatched_by_the_reconciler(
    env: dict[str, str], stack: StackFactory
) -> None:
    s = stack(env, workers=1, concurrency=2, beat=True)
    # Held while nothing of its workspace is in flight: as if the worker whose job ended had
    # been killed between its commit and its dispatch.
    with session_scope() as session:
        ensure_workspace(session, "c")
        job_id = ledger.create_job(session, workspace_id="c", kind=JobKind.ANSWER,
                                   stage=Stage.ANSWER, payload={"question": "anyone?"},
                                   held=True).id
    started = time.monotonic()
    job = s.wait_jobs([job_id], workspace="c", timeout=120)[job_id]
    assert job["state"] == "succeeded", job
    assert job["held"] is False
    assert time.monotonic() - started < 60  # a reconcile interval (1 s here), not minutes
