"""Uploads stream: the size limit is enforced while the bytes arrive, nothing half-written is
left behind, bad multipart bodies get clear errors, and file names are made safe."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.uploads import clean_filename
from models import Document, Job, JobEvent
from models.fairness import Room
from sluice.db import session_scope
from sluice.processes import API_ENV, api_command, child_env
from tests.stack import REPO, free_port

LIMIT = 1024 * 1024


@pytest.fixture
def client(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from api.app import create_app
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_MAX_UPLOAD_BYTES", str(LIMIT))
    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        yield c
    get_settings.cache_clear()


def _stored_files(env: dict[str, str]) -> list[Path]:
    return [p for p in (Path(env["SLUICE_DATA_DIR"]) / "blobs").rglob("*") if p.is_file()]


def _rows() -> tuple[int, int]:
    with session_scope() as session:
        return (session.scalar(select(func.count()).select_from(Document)) or 0,
                session.scalar(select(func.count()).select_from(Job)) or 0)


def _multipart(body: bytes, *, filename: str = "big.txt", boundary: str = "XyZ") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: text/plain\r\n\r\n").encode() + body + (
        f"\r\n--{boundary}--\r\n").encode()


def test_within_the_limit_is_stored(client: TestClient, sluice_env: dict[str, str]) -> None:
    resp = client.post("/v1/documents", files={"file": ("ok.txt", b"a" * LIMIT)})
    assert resp.status_code == 202, resp.text
    assert [p.stat().st_size for p in _stored_files(sluice_env)] == [LIMIT]


def test_over_the_limit_is_refused_while_streaming(
    client: TestClient, sluice_env: dict[str, str]
) -> None:
    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        payload = _multipart(b"b" * (3 * LIMIT))
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    resp = client.post("/v1/documents", content=body(),
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "too_large"
    assert str(LIMIT) in resp.json()["error"]["message"]
    assert _stored_files(sluice_env) == []  # not even in .incoming
    assert _rows() == (0, 0)


def test_announced_length_over_the_limit_is_refused_before_reading(
    client: TestClient, sluice_env: dict[str, str]
) -> None:
    resp = client.post("/v1/documents", content=_multipart(b"c" * (2 * LIMIT)),
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert resp.status_code == 413
    assert "Content-Length" in resp.json()["error"]["message"]
    assert _stored_files(sluice_env) == [] and _rows() == (0, 0)


@pytest.mark.parametrize(("headers", "content", "message"), [
    ({"Content-Type": "application/json"}, b"{}", "multipart/form-data"),
    ({"Content-Type": "multipart/form-data; boundary=XyZ"},
     b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ--\r\n",
     "no 'file' field"),
    ({"Content-Type": "multipart/form-data; boundary=XyZ"},
     _multipart(b"cut")[:-10], "ended before"),
    ({"Content-Type": "multipart/form-data; boundary=XyZ"}, b"garbage without boundary",
     "malformed multipart"),
])
def test_malformed_bodies_are_422(
    client: TestClient, sluice_env: dict[str, str], headers: dict[str, str], content: bytes,
    message: str,
) -> None:
    resp = client.post("/v1/documents", content=content, headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "validation_error"
    assert message in resp.json()["error"]["message"]
    assert _stored_files(sluice_env) == [] and _rows() == (0, 0)


def test_other_form_fields_are_ignored(client: TestClient) -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            + _multipart(b"the document", filename="d.txt"))
    resp = client.post("/v1/documents", content=body,
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert resp.status_code == 202, resp.text
    doc = client.get(f"/v1/documents/{resp.json()['document_id']}").json()
    assert (doc["filename"], doc["size_bytes"]) == ("d.txt", len(b"the document"))


def test_hostile_filename_is_stored_clean(client: TestClient) -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"../../etc/\x00pass\x1bwd.txt\"\r\n\r\nnamed\r\n--XyZ--\r\n")
    resp = client.post("/v1/documents", content=body,
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    doc = client.get(f"/v1/documents/{resp.json()['document_id']}").json()
    assert doc["filename"] == "passwd.txt"


def test_rfc5987_filename(client: TestClient) -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.txt\"; "
            b"filename*=UTF-8''r%C3%A9sum%C3%A9.txt\r\n\r\nbody\r\n--XyZ--\r\n")
    resp = client.post("/v1/documents", content=body,
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    doc = client.get(f"/v1/documents/{resp.json()['document_id']}").json()
    assert doc["filename"] == "résumé.txt"


@pytest.mark.parametrize(("raw", "clean"), [
    ("report.pdf", "report.pdf"),
    ("C:\\Users\\me\\report.pdf", "report.pdf"),
    ("../../../etc/passwd", "passwd"),
    ("..", "upload"),
    ("...hidden", "hidden"),
    ("", "upload"),
    (None, "upload"),
    ("a\u202egnp.exe", "agnp.exe"),                 # right-to-left override removed
    ("tab\tand\nnewline.txt", "tabandnewline.txt"),
    ("  spaced   out .txt ", "spaced out .txt"),
    ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),     # NFC: e + combining accent → é
])
def test_clean_filename(raw: str | None, clean: str) -> None:
    assert clean_filename(raw) == clean


def test_clean_filename_keeps_the_extension_within_255_bytes() -> None:
    name = clean_filename("\u00e9" * 300 + ".docx")
    assert name.endswith(".docx") and len(name.encode()) <= 255
    assert name.startswith("\u00e9" * 100)


def test_memory_does_not_grow_with_the_upload(
    sluice_env: dict[str, str], tmp_path: Path
) -> None:
    """A 256 MiB upload through the real API process (uvicorn): its RSS grows by a small,
    fixed amount, not by the file's size."""
    size = 256 * 1024 * 1024
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    proc = psutil.Popen(api_command("127.0.0.1", port), cwd=REPO, stdout=log,
                        stderr=log, env={**os.environ, **child_env(sluice_env), **API_ENV})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (
                tmp_path / "api.log").read_text()
            time.sleep(0.2)
        httpx.post(f"{url}/v1/documents", files={"file": ("warm.txt", b"warm up")})
        baseline = proc.memory_info().rss
        peak = baseline
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                peak = max(peak, proc.memory_info().rss)

        def body() -> Iterator[bytes]:
            yield (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; "
                   b"filename=\"big.txt\"\r\n\r\n")
            block = b"0123456789abcdef" * 65536  # 1 MiB
            for _ in range(size // len(block)):
                yield block
            yield b"\r\n--XyZ--\r\n"

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            resp = httpx.post(f"{url}/v1/documents", content=body(), timeout=300,
                              headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        finally:
            stop.set()
            sampler.join()
        assert resp.status_code == 202, resp.text
        assert resp.json()["duplicate"] is False
        growth = peak - baseline
        assert growth < 64 * 1024 * 1024, f"API RSS grew {growth / 2**20:.0f} MiB"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_uploads_recorded_in_one_batch_meet_the_quotas_in_turn(
    sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent uploads share a transaction (a group commit): each is checked against what
    the earlier ones of the batch took, as one transaction each would have been."""
    from api.routes import documents as route
    from api.state import blob_store
    from models.quotas import QuotaExceeded
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_QUOTA_DOCUMENTS", "2")
    monkeypatch.setenv("SLUICE_WORKSPACE_INFLIGHT_CAP", "1")
    get_settings.cache_clear()

    def upload(data: bytes, workspace: str = "ws-b") -> route._Upload:
        return route._Upload(workspace=workspace, sha256=hashlib.sha256(data).hexdigest(),
                             size=len(data), staged=blob_store().stage(data),
                             filename="f.txt", content_type="text/plain", force=False,
                             request_id=f"req-{data.decode()}-{workspace}")

    uploads = [upload(b"a"), upload(b"a"), upload(b"b"), upload(b"c"), upload(b"c", "ws-o")]
    first, again, second, over, elsewhere = route._record_uploads(uploads)
    left = [u.staged for u in uploads if u.staged is not None and u.staged.exists()]
    assert left == [uploads[1].staged, uploads[3].staged]  # the duplicate's and the refused
    for path in left:  # (as `_record_and_publish` does)
        path.unlink()
    assert not isinstance(first, Exception) and not isinstance(again, Exception)
    assert not isinstance(second, Exception) and not isinstance(elsewhere, Exception)
    assert again[0].duplicate and (again[0].document_id, again[0].job_id) == (
        first[0].document_id, first[0].job_id)
    assert isinstance(over, QuotaExceeded) and over.code == "document_quota_exceeded"
    # the first took the workspace's one in-flight slot: the second is held behind it
    assert (first[1], second[1]) == (Room(in_flight=0, held=False), Room(in_flight=1, held=False))
    with session_scope() as session:
        jobs = {j.request_id: (j.workspace_id, j.held, j.published_at is not None)
                for j in session.scalars(select(Job))}
        events = session.scalar(select(func.count()).select_from(JobEvent))
    assert jobs == {"req-a-ws-b": ("ws-b", False, True), "req-b-ws-b": ("ws-b", True, False),
                    "req-c-ws-o": ("ws-o", False, True)}
    assert events == 3
    stored = sorted(p.relative_to(p.parents[2]).parts[0] + ":" + p.read_text()
                    for p in _stored_files(sluice_env))
    assert stored == ["ws-b:a", "ws-b:b", "ws-o:c"]  # the refused upload stored nothing


def test_an_upload_when_the_database_connection_died_is_503_then_the_next_succeeds(
    pg_env: dict[str, str], pg_url: str
) -> None:
    """PostgreSQL kills the API's connections (a restart, a failover) just after they were
    used: the next upload's statement fails, is answered `503 database_unavailable` with
    nothing recorded, and the one after it gets a fresh connection and succeeds."""
    from sqlalchemy import create_engine, text

    from api.app import create_app

    with TestClient(create_app()) as c:
        first = c.post("/v1/documents", files={"file": ("a.txt", b"alpha " * 20, "text/plain")})
        assert first.status_code == 202
        admin = create_engine(pg_url)
        try:
            with admin.begin() as conn:
                killed = conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        finally:
            admin.dispose()
        assert killed
        refused = c.post("/v1/documents",
                         files={"file": ("b.txt", b"bravo " * 20, "text/plain")})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "database_unavailable"
        assert refused.headers["Retry-After"] == "2"
        again = c.post("/v1/documents", files={"file": ("b.txt", b"bravo " * 20, "text/plain")})
        assert again.status_code == 202
    assert _rows() == (2, 2)  # alpha and the retried bravo; the refused try left nothing


def test_an_upload_whose_publish_fails_after_commit_is_still_accepted(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The recorder publishes after the batch's commit: a publish that raises fails neither
    that upload (it is recorded; the reconciler republishes a queued job whose message never
    went out) nor the others of its batch."""
    from api.routes import documents as route

    def broken_publish(*_args: object, **_kwargs: object) -> bool:
        raise RuntimeError("broker client bug")

    with monkeypatch.context() as patched:
        patched.setattr(route, "publish_job", broken_publish)
        response = client.post("/v1/documents",
                               files={"file": ("a.txt", b"alpha " * 20, "text/plain")})
    assert response.status_code == 202
    with session_scope() as session:
        job = session.get(Job, response.json()["job_id"])
        assert job is not None and job.state == "queued" and job.published_at is not None
    assert "publishing after its upload failed" in caplog.text
    again = client.post("/v1/documents", files={"file": ("b.txt", b"bravo " * 20, "text/plain")})
    assert again.status_code == 202  # the recorder thread is still serving
