"""API keys, roles, the admin API, quotas and rate limits, through the real app (SQLite, the
filesystem broker; Redis where a test says so)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select

from models import ApiKey, Document, Job
from models.keys import Role
from sluice.db import read_scope, session_scope

ADMIN_TOKEN = "t" * 40

# The least role each route needs. A route missing here fails
# test_every_route_has_a_role_and_answers_401_then_403: a new route needs a decision.
LEAST_ROLE: dict[tuple[str, str], Role] = {
    ("GET", "/v1/documents"): Role.READER,
    ("GET", "/v1/documents/{document_id}"): Role.READER,
    ("GET", "/v1/jobs"): Role.READER,
    ("GET", "/v1/jobs/{job_id}"): Role.READER,
    ("GET", "/v1/jobs/{job_id}/events"): Role.READER,
    ("GET", "/v1/events"): Role.READER,
    ("POST", "/v1/answers"): Role.READER,
    ("POST", "/v1/search"): Role.READER,
    ("GET", "/v1/workspace"): Role.READER,
    ("POST", "/v1/documents"): Role.WRITER,
    ("DELETE", "/v1/documents/{document_id}"): Role.WRITER,
    ("POST", "/v1/jobs/{job_id}/cancel"): Role.WRITER,
    ("GET", "/v1/dead-letters"): Role.ADMIN,
    ("GET", "/v1/dead-letters/{job_id}"): Role.ADMIN,
    ("POST", "/v1/dead-letters/{job_id}/replay"): Role.ADMIN,
    ("POST", "/v1/dead-letters/replay"): Role.ADMIN,
    ("DELETE", "/v1/dead-letters/{job_id}"): Role.ADMIN,
    ("GET", "/v1/keys"): Role.ADMIN,
    ("POST", "/v1/keys"): Role.ADMIN,
    ("DELETE", "/v1/keys/{key_id}"): Role.ADMIN,
}
STREAMS_FOREVER = {("GET", "/v1/events")}


def configure(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    from sluice.db import dispose_engine
    from sluice.settings import get_settings

    for name, value in settings.items():
        monkeypatch.setenv(f"SLUICE_{name.upper()}", value)
    get_settings.cache_clear()
    dispose_engine()


@pytest.fixture
def auth_env(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    configure(monkeypatch, auth_enabled="1", admin_token=ADMIN_TOKEN)
    return sluice_env


@pytest.fixture
def client(auth_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def new_key(workspace: str, role: Role | str, rate_limit: str | None = None) -> str:
    from api.deps import ensure_workspace
    from models.keys import create_key

    with session_scope() as session:
        ensure_workspace(session, workspace)
        return create_key(session, workspace_id=workspace, role=Role(role),
                          rate_limit=rate_limit).token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def v1_routes(app: Any) -> list[tuple[str, str]]:
    """Every /v1 operation, from the OpenAPI spec (no route is left out of it)."""
    return sorted((method.upper(), path) for path, item in app.openapi()["paths"].items()
                  for method in item if path.startswith("/v1/"))


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    url = path.replace("{", "").replace("}", "")  # {job_id} -> job_id: an id that is not there
    return client.request(method, url, headers=headers)


# -- keys and roles ------------------------------------------------------------------------

def test_every_route_has_a_role_and_answers_401_then_403(client: TestClient) -> None:
    routes = [r for r in v1_routes(client.app) if not r[1].startswith("/v1/admin/")]
    assert set(routes) == set(LEAST_ROLE), "give every /v1 route its least role in LEAST_ROLE"
    revoked = new_key("ws-a", Role.ADMIN)
    with session_scope() as session:
        from models.keys import parse_key_id, revoke_key

        revoke_key(session, key_id=parse_key_id(revoked) or "")
    unknown = f"sluice_{'0' * 16}_{'A' * 43}"
    keys = {role: new_key("ws-a", role) for role in Role}
    bad_credentials = {
        "missing": {}, "empty": {"Authorization": ""}, "basic": {"Authorization": "Basic eDp5"},
        "bearer without key": {"Authorization": "Bearer "}, "malformed": bearer("not-a-key"),
        "unknown": bearer(unknown), "revoked": bearer(revoked),
        "tampered": bearer(keys[Role.ADMIN][:-1] + ("A" if keys[Role.ADMIN][-1] != "A" else "B")),
        "admin token": bearer(ADMIN_TOKEN),
    }
    for method, path in routes:
        for what, headers in bad_credentials.items():
            resp = call(client, method, path, headers)
            assert resp.status_code == 401, (method, path, what, resp.text)
            assert resp.json()["error"]["code"] in ("unauthorized", "invalid_key")
            assert resp.headers["www-authenticate"].startswith("Bearer")
        for role, token in keys.items():
            if (method, path) in STREAMS_FOREVER and role.allows(LEAST_ROLE[(method, path)]):
                continue
            resp = call(client, method, path, bearer(token))
            if role.allows(LEAST_ROLE[(method, path)]):
                assert resp.status_code not in (401, 403), (method, path, role, resp.text)
            else:
                assert resp.status_code == 403, (method, path, role, resp.text)
                assert resp.json()["error"]["code"] == "forbidden"


def test_admin_api_takes_only_the_admin_token(client: TestClient) -> None:
    admin_key = new_key("ws-a", Role.ADMIN)
    routes = [r for r in v1_routes(client.app) if r[1].startswith("/v1/admin/")]
    assert routes
    for method, path in routes:
        for headers in ({}, bearer(admin_key), bearer("x" * 40), {"Authorization": ADMIN_TOKEN}):
            resp = call(client, method, path, headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
    created = client.post("/v1/admin/keys", headers=bearer(ADMIN_TOKEN),
                          json={"workspace": "ws-new", "role": "writer", "name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("sluice_") and body["workspace"] == "ws-new"
    me = client.get("/v1/workspace", headers=bearer(body["key"])).json()
    assert (me["workspace"], me["role"], me["key_id"]) == ("ws-new", "writer", body["id"])
    listed = client.get("/v1/admin/keys", params={"workspace": "ws-new"},
                        headers=bearer(ADMIN_TOKEN)).json()["keys"]
    assert [k["id"] for k in listed] == [body["id"]] and "key" not in listed[0]
    assert client.delete(f"/v1/admin/keys/{body['id']}",
                         headers=bearer(ADMIN_TOKEN)).status_code == 204
    assert client.get("/v1/workspace", headers=bearer(body["key"])).status_code == 401
    assert client.delete("/v1/admin/keys/nope", headers=bearer(ADMIN_TOKEN)).status_code == 404


def test_admin_api_is_off_without_a_token(
    auth_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app

    monkeypatch.delenv("SLUICE_ADMIN_TOKEN")
    configure(monkeypatch)
    with TestClient(create_app()) as client:
        resp = client.get("/v1/admin/keys", headers=bearer(ADMIN_TOKEN))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "admin_api_disabled"


def test_admin_key_manages_its_own_workspace_keys_only(client: TestClient) -> None:
    admin = bearer(new_key("ws-a", Role.ADMIN))
    other = new_key("ws-b", Role.READER)
    made = client.post("/v1/keys", headers=admin, json={"role": "reader", "name": "bot"})
    assert made.status_code == 201 and made.json()["workspace"] == "ws-a"
    listed = client.get("/v1/keys", headers=admin).json()["keys"]
    assert {k["workspace"] for k in listed} == {"ws-a"} and len(listed) == 2
    other_id = other.split("_")[1]
    assert client.delete(f"/v1/keys/{other_id}", headers=admin).status_code == 404
    assert client.get("/v1/workspace", headers=bearer(other)).status_code == 200
    assert client.delete(f"/v1/keys/{made.json()['id']}", headers=admin).status_code == 204
    assert client.get("/v1/workspace", headers=bearer(made.json()["key"])).status_code == 401
    bad = client.post("/v1/keys", headers=admin, json={"role": "root"})
    assert bad.status_code == 422
    assert client.post("/v1/keys", headers=admin,
                       json={"role": "reader", "rate_limit": "lots"}).status_code == 422


def test_keys_are_stored_as_hashes_and_record_their_last_use(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, key_touch_interval_s="0")
    token = new_key("ws-a", Role.READER)
    key_id = token.split("_")[1]
    with read_scope() as session:
        row = session.get_one(ApiKey, key_id)
        assert row.secret_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in {str(getattr(row, c.key)) for c in ApiKey.__table__.columns}
        assert row.last_used_at is None
    assert client.get("/v1/documents", headers=bearer(token)).status_code == 200
    with read_scope() as session:
        first = session.get_one(ApiKey, key_id).last_used_at
    assert first is not None
    assert client.get("/v1/documents", headers=bearer(token)).status_code == 200
    with read_scope() as session:
        assert session.get_one(ApiKey, key_id).last_used_at >= first


def test_the_workspace_comes_from_the_key(client: TestClient) -> None:
    writer_a = bearer(new_key("ws-a", Role.WRITER))
    up = client.post("/v1/documents", headers={**writer_a, "X-Workspace": "ws-a"},
                     files={"file": ("a.txt", b"alpha")})
    assert up.status_code == 202
    with read_scope() as session:
        assert session.get_one(Document, up.json()["document_id"]).workspace_id == "ws-a"
    # naming another workspace with the key is refused, never obeyed
    other = client.get("/v1/documents", headers={**writer_a, "X-Workspace": "ws-b"})
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"


def test_cli_creates_lists_and_revokes_keys(client: TestClient) -> None:
    from click.testing import CliRunner

    from sluice.cli import main

    runner = CliRunner()
    made = runner.invoke(main, ["keys", "create", "--workspace", "ws-cli", "--role", "writer",
                                "--name", "deploy"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("sluice_")
    assert client.post("/v1/documents", headers=bearer(token),
                       files={"file": ("c.txt", b"from the cli")}).status_code == 202
    listed = runner.invoke(main, ["keys", "list", "--workspace", "ws-cli", "--json"])
    assert listed.exit_code == 0 and token not in listed.output
    assert '"role": "writer"' in listed.output and '"name": "deploy"' in listed.output
    key_id = token.split("_")[1]
    assert runner.invoke(main, ["keys", "revoke", key_id]).exit_code == 0
    assert client.get("/v1/documents", headers=bearer(token)).status_code == 401
    assert runner.invoke(main, ["keys", "create", "--workspace", "../x",
                                "--role", "reader"]).exit_code != 0


def test_production_refuses_to_start_with_auth_off(
    sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app
    from sluice.settings import Settings

    configure(monkeypatch, env="production")
    with pytest.raises(ValidationError, match="auth off"):
        create_app()
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(auth_enabled=True, admin_token="short")
    with pytest.raises(ValidationError):
        Settings(rate_limit_per_key="lots")
    configure(monkeypatch, auth_enabled="1")
    create_app()
    assert Settings(auth_enabled=True, admin_token="").admin_token is None  # `${VAR:-}` unset


def test_auth_off_keeps_the_x_workspace_header(sluice_env: dict[str, str]) -> None:
    from api.app import create_app

    with TestClient(create_app()) as client:
        me = client.get("/v1/workspace", headers={"X-Workspace": "team"}).json()
        assert (me["workspace"], me["role"], me["key_id"]) == ("team", "admin", None)
        assert client.get("/v1/workspace", headers={"X-Workspace": "a/b"}).status_code == 400


def test_idempotency_records_belong_to_the_key_that_made_them(client: TestClient) -> None:
    first_key, second_key = new_key("ws-a", Role.WRITER), new_key("ws-a", Role.WRITER)
    headers = {**bearer(first_key), "Idempotency-Key": "ask-1"}
    first = client.post("/v1/answers", json={"question": "once?"}, headers=headers)
    again = client.post("/v1/answers", json={"question": "once?"}, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
    other = client.post("/v1/answers", json={"question": "once?"},
                        headers={**bearer(second_key), "Idempotency-Key": "ask-1"})
    assert other.status_code == 202 and "idempotent-replayed" not in other.headers
    assert other.json() != first.json()
    anonymous = client.post("/v1/answers", json={"question": "once?"},
                            headers={"Idempotency-Key": "ask-1"})
    assert anonymous.status_code == 401


# -- rate limits ---------------------------------------------------------------------------

def test_rate_limit_per_key_is_a_moving_window(client: TestClient) -> None:
    limited = bearer(new_key("ws-a", Role.READER, rate_limit="3/minute"))
    free = bearer(new_key("ws-a", Role.READER))
    assert [client.get("/v1/jobs", headers=limited).status_code for _ in range(3)] == [200] * 3
    over = client.get("/v1/jobs", headers=limited)
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert client.get("/v1/jobs", headers=free).status_code == 200  # per key


def test_rate_limit_windows_are_shared_in_redis(
    auth_env: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two API processes (two apps) on one Redis count one window per key."""
    import redis

    from api.app import create_app

    prefix = f"test-auth-{uuid.uuid4().hex[:8]}:"
    configure(monkeypatch, rate_limit_storage_url=redis_url, broker_key_prefix=prefix,
              rate_limit_per_key="4/minute")
    token = bearer(new_key("ws-a", Role.READER))
    server = redis.Redis.from_url(redis_url)
    try:
        with TestClient(create_app()) as one, TestClient(create_app()) as two:
            codes = [c.get("/v1/jobs", headers=token).status_code for c in (one, two) * 3]
        assert codes == [200, 200, 200, 200, 429, 429]
        assert list(server.scan_iter(match=f"{prefix}*"))  # the windows live under the prefix
    finally:
        for key in server.scan_iter(match=f"{prefix}*"):
            server.delete(key)


# -- quotas --------------------------------------------------------------------------------

def _set_quota(client: TestClient, workspace: str, **values: int | None) -> dict[str, Any]:
    resp = client.put(f"/v1/admin/workspaces/{workspace}/quotas", json=values,
                      headers=bearer(ADMIN_TOKEN))
    assert resp.status_code == 200, resp.text
    return resp.json()


def _counts(workspace: str) -> tuple[int, int]:
    with read_scope() as session:
        docs = session.scalar(select(func.count()).select_from(Document)
                              .where(Document.workspace_id == workspace))
        jobs = session.scalar(select(func.count()).select_from(Job)
                              .where(Job.workspace_id == workspace))
        return int(docs or 0), int(jobs or 0)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_document_quota_is_429_and_adds_nothing(client: TestClient) -> None:
    writer = bearer(new_key("ws-q", Role.WRITER))
    quota = _set_quota(client, "ws-q", documents=2)
    assert quota["limits"]["documents"] == 2 and quota["overrides"]["stored_bytes"] is None
    for i in range(2):
        assert client.post("/v1/documents", headers=writer,
                           files={"file": (f"{i}.txt", f"doc {i}".encode())}).status_code == 202
    over = client.post("/v1/documents", headers=writer, files={"file": ("x.txt", b"third")})
    assert over.status_code == 429 and over.json()["error"]["code"] == "document_quota_exceeded"
    assert "retry-after" not in over.headers  # waiting does not help; deleting does
    assert _counts("ws-q") == (2, 2)
    # a full workspace refuses before reading the body, even bytes it holds already
    again = client.post("/v1/documents", headers=writer, files={"file": ("0.txt", b"doc 0")})
    assert again.status_code == 429
    me = client.get("/v1/workspace", headers=writer).json()
    assert me["quota"]["usage"]["documents"] == 2


def test_storage_quota_is_413_mid_stream_and_leaves_no_blob(
    client: TestClient, auth_env: dict[str, str]
) -> None:
    writer = bearer(new_key("ws-s", Role.WRITER))
    _set_quota(client, "ws-s", stored_bytes=1000)
    assert client.post("/v1/documents", headers=writer,
                       files={"file": ("a.txt", b"a" * 600)}).status_code == 202
    blobs = Path(auth_env["SLUICE_DATA_DIR"]) / "blobs"
    before = _files(blobs)
    for size in (600, 300_000):  # streamed past the room; announced far over it
        over = client.post("/v1/documents", headers=writer,
                           files={"file": ("b.txt", b"b" * size)})
        assert over.status_code == 413, over.text
        assert over.json()["error"]["code"] == "storage_quota_exceeded"
        assert _counts("ws-s") == (1, 1)
        assert _files(blobs) == before  # no blob, no temp file
    assert client.post("/v1/documents", headers=writer,
                       files={"file": ("c.txt", b"c" * 400)}).status_code == 202


def test_queued_jobs_quota_is_429_with_retry_after(client: TestClient) -> None:
    writer = bearer(new_key("ws-j", Role.WRITER))
    _set_quota(client, "ws-j", queued_jobs=1)
    first = client.post("/v1/documents", headers=writer, files={"file": ("a.txt", b"one")})
    assert first.status_code == 202
    for over in (client.post("/v1/documents", headers=writer, files={"file": ("b.txt", b"2")}),
                 client.post("/v1/answers", headers=writer, json={"question": "anything?"})):
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "queued_jobs_quota_exceeded"
        assert over.headers["retry-after"] == "30"
    assert _counts("ws-j") == (1, 1)
    client.post(f"/v1/jobs/{first.json()['job_id']}/cancel", headers=writer)
    assert client.post("/v1/documents", headers=writer,
                       files={"file": ("b.txt", b"2")}).status_code == 202


def test_answers_per_minute_is_a_moving_window_per_workspace(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, quota_answers_per_minute="2")  # the default, for every workspace
    a, b = bearer(new_key("ws-a", Role.READER)), bearer(new_key("ws-b", Role.READER))
    codes = [client.post("/v1/answers", headers=a, json={"question": f"q{i}?"}).status_code
             for i in range(2)]
    assert codes == [202, 202]
    over = client.post("/v1/answers", headers=a, json={"question": "one more?"})
    assert over.status_code == 429 and over.json()["error"]["code"] == "answer_quota_exceeded"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert _counts("ws-a") == (0, 2)
    assert client.post("/v1/answers", headers=b, json={"question": "b?"}).status_code == 202
    _set_quota(client, "ws-a", answers_per_minute=5)  # an override lifts it
    assert client.post("/v1/answers", headers=a, json={"question": "now?"}).status_code == 202


@pytest.mark.parametrize("locked_by", ["lock_workspace", "measure"])
def test_quota_checks_are_serialised_per_workspace(any_db: dict[str, str], locked_by: str
                                                   ) -> None:
    """Two transactions that each check the document quota (1) and then add a document: the
    second waits on the workspace lock until the first commits, then sees its document.
    `measure(lock=True)` (the upload's one statement) locks as `lock_workspace` does."""
    import threading
    import time

    from api.deps import ensure_workspace
    from models import quotas

    quota = quotas.Quota(documents=1)
    with session_scope() as session:
        ensure_workspace(session, "ws-c")
    first_checked = threading.Event()
    outcomes: dict[str, str] = {}

    def add(name: str, hold_s: float) -> None:
        try:
            with session_scope() as session:
                used = None
                if locked_by == "measure":
                    _, used = quotas.measure(session, workspace_id="ws-c", defaults=quota,
                                             lock=True)
                else:
                    quotas.lock_workspace(session, workspace_id="ws-c")
                quotas.check_document(session, workspace_id="ws-c", quota=quota, size_bytes=1,
                                      used=used)
                first_checked.set()
                time.sleep(hold_s)  # the window a concurrent check would slip through
                session.add(Document(workspace_id="ws-c", filename=name, sha256="0" * 64,
                                     size_bytes=1))
            outcomes[name] = "added"
        except quotas.QuotaExceeded as exc:
            outcomes[name] = exc.code

    first = threading.Thread(target=add, args=("first", 0.5))
    first.start()
    assert first_checked.wait(10)
    add("second", 0)
    first.join()
    assert outcomes == {"first": "added", "second": "document_quota_exceeded"}
    assert _counts("ws-c") == (1, 0)


def test_measure_reads_the_effective_quota_and_the_usage(any_db: dict[str, str]) -> None:
    from api.deps import ensure_workspace
    from models import JobKind, JobState, Stage, ledger, quotas

    defaults = quotas.Quota(documents=10, stored_bytes=1000, queued_jobs=3)
    with session_scope() as session:  # no workspace row yet: the defaults, nothing used
        assert quotas.measure(session, workspace_id="ws-m", defaults=defaults) == (
            defaults, quotas.Usage(documents=0, stored_bytes=0, queued_jobs=0))
        with pytest.raises(LookupError):
            quotas.measure(session, workspace_id="ws-m", defaults=defaults, lock=True)
    with session_scope() as session:
        ensure_workspace(session, "ws-m")
        ensure_workspace(session, "ws-other")
        quotas.set_overrides(session, workspace_id="ws-m", values={"documents": 5})
        jobs = []
        for workspace, size in (("ws-m", 3), ("ws-m", 4), ("ws-other", 100)):
            doc = Document(workspace_id=workspace, filename="f", sha256="0" * 64,
                           size_bytes=size)
            session.add(doc)
            session.flush()
            jobs.append(ledger.create_job(session, workspace_id=workspace, kind=JobKind.INGEST,
                                          stage=Stage.PARSE, document_id=doc.id))
        jobs[0].state = JobState.SUCCEEDED  # finished: no longer counts as unfinished
    with session_scope() as session:
        quota, used = quotas.measure(session, workspace_id="ws-m", defaults=defaults,
                                     lock=True)
        assert quota == quotas.Quota(documents=5, stored_bytes=1000, queued_jobs=3)
        assert used == quotas.Usage(documents=2, stored_bytes=7, queued_jobs=1)
        assert quotas.usage(session, workspace_id="ws-m") == used


def test_cli_sets_and_shows_quotas(auth_env: dict[str, str]) -> None:
    from click.testing import CliRunner

    from sluice.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["quotas", "set", "--workspace", "ws-cli", "--documents", "7",
                               "--answers-per-minute", "0"])
    assert out.exit_code == 0, out.output
    shown = runner.invoke(main, ["quotas", "show", "--workspace", "ws-cli"])
    assert '"documents": 7' in shown.output and '"answers_per_minute": 0' in shown.output
    reset = runner.invoke(main, ["quotas", "set", "--workspace", "ws-cli", "--documents",
                                 "default"])
    assert reset.exit_code == 0 and '"documents": 100000' in reset.output
    assert runner.invoke(main, ["quotas", "set", "--workspace", "ws-cli", "--documents",
                                "-1"]).exit_code != 0


def test_cli_api_commands_send_the_key_from_settings(
    sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.cli import _client

    assert _client("http://x", "team").headers["x-workspace"] == "team"
    configure(monkeypatch, api_key="sluice_0123456789abcdef_secret")
    headers = _client("http://x", "team").headers
    assert headers["authorization"] == "Bearer sluice_0123456789abcdef_secret"
    assert "x-workspace" not in headers
