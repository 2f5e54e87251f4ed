"""Every endpoint through the real FastAPI app, SQLite and the filesystem broker (no worker:
these tests are about the HTTP contract, the ledger rows and the published messages)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models import Chunk, Document, DocumentStatus, Job, JobState
from sluice.db import session_scope

FTS_COUNT = "SELECT count(*) FROM chunk_fts WHERE chunk_fts MATCH 'chunk'"


@pytest.fixture
def client(sluice_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def _upload(client: TestClient, name: str, body: bytes, workspace: str = "default",
            **params: object) -> dict:
    resp = client.post("/v1/documents", files={"file": (name, body)},
                       headers={"X-Workspace": workspace}, params=params)
    assert resp.status_code in (200, 202), resp.text
    return {"status": resp.status_code, **resp.json(), "location": resp.headers.get("location")}


def _queued_messages(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["SLUICE_DATA_DIR"]) / "broker" / "queue").glob("*"))


def test_upload_records_document_and_job_then_publishes(
    client: TestClient, sluice_env: dict[str, str]
) -> None:
    body = b"Sluice keeps every job. " * 20
    out = _upload(client, "notes.txt", body)
    assert out["status"] == 202
    assert out["location"] == f"/v1/jobs/{out['job_id']}"
    assert out["duplicate"] is False
    with session_scope() as session:
        doc = session.get_one(Document, out["document_id"])
        assert doc.sha256 == hashlib.sha256(body).hexdigest()
        assert doc.size_bytes == len(body)
        assert doc.filename == "notes.txt"
        job = session.get_one(Job, out["job_id"])
        assert (job.state, job.stage, job.document_id) == ("queued", "parse", doc.id)
        assert job.published_at is not None
    blob = Path(sluice_env["SLUICE_DATA_DIR"]) / "blobs" / "default" / doc.sha256[:2] / doc.sha256
    assert blob.read_bytes() == body
    messages = _queued_messages(sluice_env)
    assert len(messages) == 1 and out["job_id"] in messages[0].read_text()


def test_identical_bytes_are_a_duplicate_unless_forced(client: TestClient) -> None:
    first = _upload(client, "a.txt", b"same bytes here")
    again = _upload(client, "b.txt", b"same bytes here")
    assert again["status"] == 200 and again["duplicate"] is True
    assert (again["document_id"], again["job_id"]) == (first["document_id"], first["job_id"])
    forced = _upload(client, "b.txt", b"same bytes here", force="true")
    assert forced["status"] == 202 and forced["document_id"] != first["document_id"]
    other_ws = _upload(client, "a.txt", b"same bytes here", workspace="other")
    assert other_ws["status"] == 202


def test_documents_list_get_and_workspace_isolation(client: TestClient) -> None:
    a = _upload(client, "a.txt", b"alpha document", workspace="A")
    _upload(client, "b.txt", b"beta document", workspace="B")
    listed = client.get("/v1/documents", headers={"X-Workspace": "A"}).json()
    assert listed["total"] == 1 and listed["documents"][0]["id"] == a["document_id"]
    got = client.get(f"/v1/documents/{a['document_id']}", headers={"X-Workspace": "A"})
    assert got.status_code == 200
    assert got.json()["status"] == DocumentStatus.PENDING
    assert got.json()["job_id"] == a["job_id"]
    # Invisible from another workspace: the same 404 as a missing id.
    for path in (f"/v1/documents/{a['document_id']}", f"/v1/jobs/{a['job_id']}"):
        resp = client.get(path, headers={"X-Workspace": "B"})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/documents/{a['document_id']}",
                         headers={"X-Workspace": "B"}).status_code == 404


def test_delete_document_removes_chunks_vectors_and_blob(
    client: TestClient, sluice_env: dict[str, str]
) -> None:
    import numpy as np
    from sqlalchemy import text

    out = _upload(client, "x.txt", b"to be deleted")
    with session_scope() as session:
        for i in range(3):
            session.add(Chunk(workspace_id="default", document_id=out["document_id"], ord=i,
                              text=f"chunk {i}", meta={},
                              embedding=np.ones(384, dtype=np.float32) / np.sqrt(384)))
    with session_scope() as session:
        assert session.scalar(text("SELECT count(*) FROM chunk_vectors")) == 3
        assert session.scalar(text(FTS_COUNT)) == 3
    assert client.delete(f"/v1/documents/{out['document_id']}").status_code == 204
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Chunk)) == 0
        assert session.scalar(text("SELECT count(*) FROM chunk_vectors")) == 0
        assert session.scalar(text(FTS_COUNT)) == 0
        assert session.get(Document, out["document_id"]) is None
        job = session.get_one(Job, out["job_id"])
        assert job.state == JobState.CANCELLED and job.document_id is None
    assert not list((Path(sluice_env["SLUICE_DATA_DIR"]) / "blobs" / "default").rglob("*/*"))
    assert client.get(f"/v1/documents/{out['document_id']}").status_code == 404


def test_get_job_shape(client: TestClient) -> None:
    out = _upload(client, "j.txt", b"job shape")
    job = client.get(f"/v1/jobs/{out['job_id']}").json()
    assert {"id", "kind", "state", "stage", "attempts", "error", "result"} <= set(job)
    assert (job["kind"], job["state"], job["stage"], job["attempts"]) == ("ingest", "queued",
                                                                         "parse", 0)
    assert job["error"] is None and job["result"] is None
    assert client.get("/v1/jobs/nope").status_code == 404


def test_job_carries_the_request_id_of_its_upload(client: TestClient) -> None:
    resp = client.post("/v1/documents", files={"file": ("r.txt", b"request id")},
                       headers={"X-Request-ID": "client-req-7"})
    assert resp.headers["X-Request-ID"] == "client-req-7"
    job = client.get(f"/v1/jobs/{resp.json()['job_id']}").json()
    assert job["request_id"] == "client-req-7"


def test_cancel_queued_job(client: TestClient) -> None:
    out = _upload(client, "c.txt", b"cancel me")
    resp = client.post(f"/v1/jobs/{out['job_id']}/cancel")
    assert resp.status_code == 200
    assert resp.json()["state"] == "cancelled"
    assert resp.json()["error"]["code"] == "cancelled"


def test_answer_request_creates_job(client: TestClient) -> None:
    resp = client.post("/v1/answers", json={"question": "What is Sluice?", "top_k": 3})
    assert resp.status_code == 202
    job = client.get(f"/v1/jobs/{resp.json()['job_id']}").json()
    assert (job["kind"], job["stage"], job["state"]) == ("answer", "answer", "queued")
    # No worker runs here: waiting gives up and still answers 202 with the job id.
    resp = client.post("/v1/answers?wait=0.2", json={"question": "Still nothing?"})
    assert resp.status_code == 202 and "job_id" in resp.json()


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/v1/answers", {"json": {"question": ""}}),
        ("post", "/v1/answers", {"json": {"question": "q", "top_k": 0}}),
        ("post", "/v1/answers",
         {"content": b"not json", "headers": {"content-type": "application/json"}}),
        ("post", "/v1/search", {"json": {"top_k": 3}}),
        ("post", "/v1/search", {"json": {"query": "x", "mode": "psychic"}}),
        ("post", "/v1/documents", {"data": {"nofile": "x"}}),
        ("get", "/v1/documents?limit=0", {}),
    ],
)
def test_malformed_requests_get_422_with_code(
    client: TestClient, method: str, path: str, kwargs: dict
) -> None:
    resp = getattr(client, method)(path, **kwargs)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "validation_error"


def test_invalid_workspace_header(client: TestClient) -> None:
    resp = client.get("/v1/documents", headers={"X-Workspace": "../etc"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_workspace"


def test_upload_over_the_limit_is_413_and_leaves_nothing(
    client: TestClient, sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    resp = client.post("/v1/documents", files={"file": ("big.txt", b"x" * 5000)})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "too_large"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Document)) == 0
    blobs = Path(sluice_env["SLUICE_DATA_DIR"]) / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()]


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/documents", "/v1/documents/{document_id}", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/cancel", "/v1/answers", "/v1/search"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_idempotency_key_makes_a_post_safe_to_retry(client: TestClient) -> None:
    headers = {"Idempotency-Key": "ask-1"}
    first = client.post("/v1/answers", json={"question": "once?"}, headers=headers)
    again = client.post("/v1/answers", json={"question": "once?"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    # the same key for another request is refused; another workspace has its own keys
    other = client.post("/v1/answers?wait=0", json={"question": "x"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    elsewhere = client.post("/v1/answers", json={"question": "once?"},
                            headers={**headers, "X-Workspace": "B"})
    assert elsewhere.status_code == 202 and elsewhere.json() != first.json()

    up1 = client.post("/v1/documents", files={"file": ("a.txt", b"one")},
                      headers={"Idempotency-Key": "up-1"})
    up2 = client.post("/v1/documents", files={"file": ("a.txt", b"one")},
                      headers={"Idempotency-Key": "up-1"})
    assert up1.status_code == up2.status_code == 202 and up1.json() == up2.json()
