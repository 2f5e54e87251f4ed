"""/readyz and `sluice status` against the real stack: API and Celery worker processes on a
real broker and database (the embedded default; /readyz also on PostgreSQL + Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from models import JobKind, Stage, ledger
from models.entities import utcnow
from sluice.db import session_scope
from tests.stack import REPO, Stack, StackFactory

pytestmark = pytest.mark.integration

QUEUES = {"parse", "embed", "answer", "maintenance"}


@pytest.fixture(params=["embedded", "postgres+redis"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    name = "sluice_env" if request.param == "embedded" else "production_env"
    result: dict[str, str] = request.getfixturevalue(name)
    return result


def _readyz(s: Stack) -> httpx.Response:
    return httpx.get(f"{s.url}/readyz", timeout=30)


def _wait_readyz(s: Stack, status: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = _readyz(s)
        if resp.status_code == status or time.monotonic() > deadline:
            assert resp.status_code == status, (resp.text, s.logs())
            body: dict[str, Any] = resp.json()
            return body
        time.sleep(0.5)


def test_readyz_needs_a_worker_for_every_queue(env: dict[str, str], stack: StackFactory) -> None:
    s = stack(env, workers=0)
    assert httpx.get(f"{s.url}/healthz").json() == {"status": "ok"}
    resp = _readyz(s)
    assert resp.status_code == 503
    body = resp.json()
    assert body["ready"] is False
    assert body["database"]["ok"] is True and body["database"]["revision"] == \
        body["database"]["head"]
    assert body["broker"]["ok"] is True
    assert set(body["queues"]) == QUEUES
    assert all(q == {"ready": False, "workers": []} for q in body["queues"].values())

    s.start_worker("worker0")
    s.wait_ready()
    body = _wait_readyz(s, 200)
    assert body["ready"] is True
    for queue in QUEUES:
        assert body["queues"][queue]["ready"] is True
        assert [h.split("@")[0] for h in body["queues"][queue]["workers"]] == ["worker0"]


def _status(s: Stack) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "sluice.cli", "status", "--json"], env=s.env,
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _bury_a_job(workspace: str) -> None:
    """One dead job, through the ledger's own transitions."""
    with session_scope() as session:
        job = ledger.create_job(session, workspace_id=workspace, kind=JobKind.ANSWER,
                                stage=Stage.ANSWER, payload={"question": "?"})
        job_id = job.id
    with session_scope() as session:
        claim = ledger.start(session, job_id=job_id, stage=Stage.ANSWER, worker="gone@nowhere",
                             stale_before=utcnow())
        assert claim is not None
        assert ledger.retry_or_bury(session, claim, max_retries=0, delay_s=0,
                                    code="connection_error", message="broker away") == "dead"


def test_status_shows_depth_workers_and_dead_letters(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    # No worker serves `parse`: uploads wait there.
    s = stack(sluice_env, queues="embed,answer,maintenance")
    job_ids = []
    for i in range(2):
        path = tmp_path / f"note{i}.txt"
        path.write_text(f"Note {i}: the sluice gate opens at dawn.\n")
        resp = s.upload(path)
        assert resp.status_code == 202, resp.text
        job_ids.append(resp.json()["job_id"])
    _bury_a_job("default")

    report = _status(s)
    assert report["ready"] is False
    assert report["database"]["ok"] is True and report["broker"]["ok"] is True
    parse = report["queues"]["parse"]
    assert parse["workers"] == [] and parse["queued"] == 2 and parse["depth"] == 2
    assert parse["oldest_queued_age_s"] > 0
    for queue in ("embed", "answer", "maintenance"):
        assert report["queues"][queue]["depth"] == 0
        assert [h.split("@")[0] for h in report["queues"][queue]["workers"]] == ["worker0"]
    [worker] = report["workers"]
    assert worker["hostname"].startswith("worker0@")
    assert worker["queues"] == ["answer", "embed", "maintenance"]
    assert worker["active"] == []
    assert report["running_jobs"] == [] and report["running_total"] == 0
    assert report["dead_letters"] == 1

    # The plain text form says the same.
    out = subprocess.run([sys.executable, "-m", "sluice.cli", "status"], env=s.env, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "ready: NO" in out and "dead letters: 1" in out
    assert any(line.split()[:2] == ["parse", "2"] for line in out.splitlines())
