"""Dead letters over HTTP: list with filters, show attempts, replay (one, bulk), discard."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from api.deps import ensure_workspace
from models import Job, JobKind, JobState, Stage, ledger
from models.entities import utcnow
from sluice.db import session_scope


@pytest.fixture
def client(sluice_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def _dead_job(workspace: str = "default", *, code: str = "database_unavailable",
              stage: Stage = Stage.ANSWER, attempts: int = 2) -> str:
    with session_scope() as session:
        ensure_workspace(session, workspace)
        job_id = ledger.create_job(session, workspace_id=workspace, kind=JobKind.ANSWER,
                                   stage=stage, payload={"question": "q"}).id
    for _ in range(attempts):
        with session_scope() as session:
            claim = ledger.start(session, job_id=job_id, stage=stage, worker="w",
                                 stale_before=utcnow() - timedelta(minutes=1))
            assert claim is not None
            ledger.retry_or_bury(session, claim, max_retries=attempts - 1, delay_s=0, code=code,
                                 message=f"{code} happened", traceback="Traceback: boom")
    return job_id


def test_list_filter_show_replay_discard(client: TestClient) -> None:
    a = _dead_job(code="database_unavailable")
    b = _dead_job(code="timeout")
    other = _dead_job("elsewhere")

    listed = client.get("/v1/dead-letters").json()["dead_letters"]
    assert {d["id"] for d in listed} == {a, b}
    assert all(d["queue"] == "answer" and d["state"] == "dead" for d in listed)
    by_code = client.get("/v1/dead-letters", params={"error_code": "timeout"}).json()
    assert [d["id"] for d in by_code["dead_letters"]] == [b]
    assert client.get("/v1/dead-letters", params={"queue": "parse"}).json()["dead_letters"] == []
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert client.get("/v1/dead-letters", params={"since": future}).json()["dead_letters"] == []
    assert client.get("/v1/dead-letters", params={"queue": "nope"}).status_code == 422

    shown = client.get(f"/v1/dead-letters/{a}").json()
    assert [x["attempt"] for x in shown["attempts_detail"]] == [1, 2]
    assert all(x["traceback"] == "Traceback: boom" for x in shown["attempts_detail"])
    assert shown["error"]["code"] == "database_unavailable"
    assert client.get(f"/v1/dead-letters/{other}").status_code == 404

    replayed = client.post(f"/v1/dead-letters/{a}/replay").json()
    assert replayed["state"] == "queued"
    with session_scope() as session:
        job = session.get_one(Job, a)
        assert job.replayed_at is not None and job.published_at is not None
    assert client.get(f"/v1/dead-letters/{a}").status_code == 404  # no longer dead
    # the history is kept
    with session_scope() as session:
        claim = ledger.start(session, job_id=a, stage=Stage.ANSWER, worker="w",
                             stale_before=utcnow())
        assert claim is not None and claim.attempt == 1

    bulk = client.post("/v1/dead-letters/replay", params={"error_code": "timeout"}).json()
    assert bulk["replayed"] == [b]

    c = _dead_job()
    assert client.delete(f"/v1/dead-letters/{c}").status_code == 204
    with session_scope() as session:
        assert session.get(Job, c) is None
        assert session.get_one(Job, other).state == JobState.DEAD
    assert client.delete(f"/v1/dead-letters/{other}").status_code == 404
