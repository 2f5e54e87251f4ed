"""Workspace isolation, property-based: several workspaces with random documents (sharing a
vocabulary, so every query matches chunks of every workspace) and random queries, some of them
naming another workspace's secret words. No response body, search hit, answer citation, event,
dead letter, metric or task message ever shows another workspace's data, and no id of another
workspace's document, job or dead letter can be read, changed or followed.

The API is the real app with auth on (SQLite, the filesystem broker). No worker runs: a
document's chunks are stored as the embed stage would store them (vectors from the same model,
through the API's numpy encoder), and the answer stage runs in-process through the real stage
runner, with that encoder standing in for the torch model."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from models import (
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobKind,
    JobState,
    Stage,
    ledger,
)
from models.entities import utcnow
from models.keys import Role
from sluice.db import read_scope, session_scope
from tests.api.test_auth import ADMIN_TOKEN, bearer, configure, new_key

VOCABULARY = ("river", "sluice", "gate", "water", "flow", "lock", "canal", "barge", "level",
              "pump", "valve", "channel", "flood", "basin", "weir", "stream", "harbour", "dam")
MODES = ("hybrid", "dense", "fulltext")
_names = itertools.count()

words = st.lists(st.sampled_from(VOCABULARY), min_size=3, max_size=12)
documents = st.lists(words, min_size=1, max_size=3)  # a document: its chunks
workspaces = st.lists(st.lists(documents, min_size=1, max_size=2), min_size=2, max_size=3)


@dataclass
class Tenant:
    name: str
    secret: str
    keys: dict[Role, str]
    documents: set[str] = field(default_factory=set)
    chunks: set[int] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)
    filenames: set[str] = field(default_factory=set)
    dead: str = ""

    def headers(self, role: Role = Role.ADMIN) -> dict[str, str]:
        return bearer(self.keys[role])

    @property
    def private_strings(self) -> set[str]:
        """What only this workspace's callers may ever see."""
        return {self.secret, *self.documents, *self.jobs, *self.filenames, self.dead}


@pytest.fixture
def client(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from api.app import create_app
    from api.state import query_encoder
    from workers import resources

    configure(monkeypatch, auth_enabled="1", admin_token=ADMIN_TOKEN,
              quota_answers_per_minute="none", rate_limit_per_key="none")
    # the answer stage's model: the same weights through the API's numpy encoder
    monkeypatch.setattr(resources, "_embedder", query_encoder())
    monkeypatch.setattr(resources, "_generator", None)
    with TestClient(create_app()) as c:
        yield c


def _ingest(client: TestClient, tenant: Tenant, chunks: list[list[str]], number: int) -> None:
    """Upload through the API, then store the chunks and vectors as the embed stage does."""
    from api.state import query_encoder

    filename = f"{tenant.secret}-doc{number}.txt"
    texts = [" ".join([*chunk, tenant.secret]) for chunk in chunks]
    resp = client.post("/v1/documents", headers=tenant.headers(Role.WRITER),
                       files={"file": (filename, "\n\n".join(texts).encode())})
    assert resp.status_code == 202, resp.text
    doc_id, job_id = resp.json()["document_id"], resp.json()["job_id"]
    vectors = query_encoder().encode(texts)
    with session_scope() as session:
        rows = [Chunk(workspace_id=tenant.name, document_id=doc_id, ord=i, text=text, meta={},
                      embedding=vectors[i]) for i, text in enumerate(texts)]
        session.add_all(rows)
        session.flush()
        tenant.chunks |= {row.id for row in rows}
        session.execute(update(Document).where(Document.id == doc_id)
                        .values(status=DocumentStatus.READY, chunk_count=len(rows)))
    tenant.documents.add(doc_id)
    tenant.jobs.add(job_id)
    tenant.filenames.add(filename)


def _bury(tenant: Tenant) -> None:
    """A dead job (its one retry ran out) through the ledger, its error, attempt and
    traceback naming the workspace's secret."""
    with session_scope() as session:
        job = ledger.create_job(session, workspace_id=tenant.name, kind=JobKind.ANSWER,
                                stage=Stage.ANSWER, payload={"question": tenant.secret})
        tenant.dead = job.id
        tenant.jobs.add(job.id)
    with session_scope() as session:
        claim = ledger.start(session, job_id=tenant.dead, stage=Stage.ANSWER, worker="w",
                             stale_before=utcnow())
        assert claim is not None
        assert ledger.retry_or_bury(session, claim, max_retries=0, delay_s=0, code="timeout",
                                    message=f"gave up on {tenant.secret}",
                                    traceback=f"Traceback: {tenant.secret}") == JobState.DEAD


def _answer(client: TestClient, tenant: Tenant, question: str) -> dict[str, Any]:
    from tasks.answer import _answer as answer_stage
    from tasks.runner import run_stage

    resp = client.post("/v1/answers", headers=tenant.headers(Role.READER),
                       json={"question": question, "top_k": 5})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    tenant.jobs.add(job_id)
    assert run_stage(job_id=job_id, stage=Stage.ANSWER, work=answer_stage) == JobState.SUCCEEDED
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers(Role.READER))
    assert job.status_code == 200
    return job.json()


def _workspace_events(tenant: Tenant) -> list[dict[str, Any]]:
    """The first batch of the workspace's event stream (`GET /v1/events` with
    `Last-Event-ID: 0`), read through the route's own generator: a stream that never ends
    cannot be read to its end through the test client."""
    from api.routes.events import _stream

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    async def first_batch() -> list[str]:
        return [chunk async for chunk in _stream(Gone(), workspace=tenant.name,  # type: ignore[arg-type]
                                                 job_id=None, after=0)]

    chunks = anyio.run(first_batch)
    return [json.loads(line[len("data: "):]) for chunk in chunks
            for line in chunk.splitlines() if line.startswith("data: ")]


def _no_leak(body: str, tenant: Tenant, others: list[Tenant], what: str) -> None:
    for other in others:
        leaked = {s for s in other.private_strings if s and s in body}
        assert not leaked, f"{what} for {tenant.name} shows {other.name}'s {leaked}"


def _broker_messages(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["SLUICE_DATA_DIR"]) / "broker" / "queue").glob("*"))


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=workspaces, data=st.data())
def test_no_workspace_ever_sees_another(
    client: TestClient, sluice_env: dict[str, str], spec: list[list[list[list[str]]]],
    data: st.DataObject,
) -> None:
    tenants = []
    for docs in spec:
        n = next(_names)
        name = f"ws{n}"
        tenant = Tenant(name=name, secret=f"zq{n}secret",
                        keys={role: new_key(name, role) for role in Role})
        for number, chunks in enumerate(docs):
            _ingest(client, tenant, chunks, number)
        _bury(tenant)
        tenants.append(tenant)

    for tenant in tenants:
        others = [t for t in tenants if t is not tenant]
        reader, writer, admin = (tenant.headers(r) for r in (Role.READER, Role.WRITER, Role.ADMIN))
        other_secrets = [o.secret for o in others]
        queries = data.draw(st.lists(
            st.lists(st.sampled_from(VOCABULARY + tuple(other_secrets)), min_size=1, max_size=4)
            .map(" ".join), min_size=1, max_size=2), label=f"queries of {tenant.name}")

        # search: every hit is the workspace's own, whatever the query names
        for query, mode in itertools.product(queries, MODES):
            resp = client.post("/v1/search", headers=reader,
                               json={"query": query, "mode": mode, "top_k": 50})
            assert resp.status_code == 200, resp.text
            found = resp.json()
            assert found["query"] == query  # the caller's own words, echoed
            for hit in found["results"]:
                assert hit["document_id"] in tenant.documents, (tenant.name, query, mode, hit)
                assert hit["chunk_id"] in tenant.chunks, (tenant.name, query, mode, hit)
            _no_leak(json.dumps(found["results"]), tenant, others, f"search {query!r} ({mode})")
        # own-secret search finds own chunks: the index is really there
        own = client.post("/v1/search", headers=reader,
                          json={"query": tenant.secret, "mode": "fulltext"}).json()["results"]
        assert own and {h["document_id"] for h in own} <= tenant.documents

        # answers: citations are the workspace's own
        job = _answer(client, tenant, queries[0])
        for citation in job["result"]["citations"]:
            assert citation["document_id"] in tenant.documents, (tenant.name, citation)
        _no_leak(json.dumps(job), tenant, others, "answer")

        # listings
        for path, headers in (("/v1/documents?limit=500", reader), ("/v1/jobs?limit=500", reader),
                              ("/v1/dead-letters", admin), ("/v1/keys", admin),
                              ("/v1/workspace", reader)):
            resp = client.get(path, headers=headers)
            assert resp.status_code == 200, (path, resp.text)
            _no_leak(resp.text, tenant, others, path)
        listed = client.get("/v1/documents?limit=500", headers=reader).json()["documents"]
        assert {d["id"] for d in listed} == tenant.documents
        assert {j["id"] for j in client.get("/v1/jobs?limit=500", headers=reader).json()} \
            <= tenant.jobs
        dead = client.get("/v1/dead-letters", headers=admin).json()["dead_letters"]
        assert [d["id"] for d in dead] == [tenant.dead]
        detail = client.get(f"/v1/dead-letters/{tenant.dead}", headers=admin)
        assert tenant.secret in detail.text  # its own traceback is there
        _no_leak(detail.text, tenant, others, "dead letter")

        # events: the job's stream and the workspace's stream
        stream = client.get(f"/v1/jobs/{tenant.dead}/events", headers=reader)
        assert stream.status_code == 200 and tenant.dead in stream.text
        _no_leak(stream.text, tenant, others, "job events")
        events = _workspace_events(tenant)
        assert events and {e["job_id"] for e in events} <= tenant.jobs
        _no_leak(json.dumps(events), tenant, others, "workspace events")
        other_stream = client.get("/v1/events", params={"workspace": others[0].name},
                                  headers=reader)
        assert other_stream.status_code == 403

        # another workspace's ids: not found, whatever the role and the verb
        for other in others:
            for doc_id in other.documents:
                assert client.get(f"/v1/documents/{doc_id}", headers=reader).status_code == 404
                assert client.delete(f"/v1/documents/{doc_id}", headers=writer).status_code == 404
            for job_id in other.jobs:
                assert client.get(f"/v1/jobs/{job_id}", headers=reader).status_code == 404
                assert client.get(f"/v1/jobs/{job_id}/events", headers=reader).status_code == 404
                assert client.post(f"/v1/jobs/{job_id}/cancel", headers=writer).status_code == 404
            for path, method in ((f"/v1/dead-letters/{other.dead}", "GET"),
                                 (f"/v1/dead-letters/{other.dead}/replay", "POST"),
                                 (f"/v1/dead-letters/{other.dead}", "DELETE")):
                assert client.request(method, path, headers=admin).status_code == 404
            other_key = other.keys[Role.READER].split("_")[1]
            assert client.delete(f"/v1/keys/{other_key}", headers=admin).status_code == 404
            replayed = client.post("/v1/dead-letters/replay", headers=admin,
                                   params={"queue": "answer", "error_code": "no-such-code"})
            assert replayed.json() == {"replayed": []}

    # nothing above changed another workspace: its documents and dead letters are all there
    with read_scope() as session:
        for tenant in tenants:
            docs = set(session.scalars(select(Document.id)
                                       .where(Document.workspace_id == tenant.name)))
            assert docs == tenant.documents
            assert session.get_one(Job, tenant.dead).state == JobState.DEAD

    # metrics and task messages carry ids and counts, never a workspace's text
    metrics = client.get("/metrics").text
    messages = [p.read_text() for p in _broker_messages(sluice_env)]
    for tenant in tenants:
        for secret in (tenant.secret, tenant.name, *tenant.filenames):
            assert secret not in metrics, secret
        for raw in messages:
            assert tenant.secret not in raw and not any(f in raw for f in tenant.filenames)
    all_jobs = set().union(*(t.jobs for t in tenants))
    for raw in messages:
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {} and len(args) == 1  # the job id alone
        if args[0] in all_jobs:
            assert message["headers"]["argsrepr"] == repr(args)


def test_same_bytes_in_two_workspaces_are_two_blobs(
    client: TestClient, sluice_env: dict[str, str]
) -> None:
    """No cross-workspace deduplication (which would tell one workspace what another
    holds): identical bytes are a new document and a separate blob in each workspace, and
    deleting one leaves the other."""
    a = {r: new_key("blob-a", r) for r in Role}
    b = {r: new_key("blob-b", r) for r in Role}
    body = b"the very same bytes"
    first = client.post("/v1/documents", headers=bearer(a[Role.WRITER]),
                        files={"file": ("same.txt", body)})
    second = client.post("/v1/documents", headers=bearer(b[Role.WRITER]),
                         files={"file": ("same.txt", body)})
    assert first.status_code == second.status_code == 202
    assert second.json()["duplicate"] is False
    blobs = Path(sluice_env["SLUICE_DATA_DIR"]) / "blobs"
    paths = sorted(p.relative_to(blobs).parts[0] for p in blobs.rglob("*")
                   if p.is_file() and ".incoming" not in p.parts)
    assert paths == ["blob-a", "blob-b"]
    assert client.delete(f"/v1/documents/{first.json()['document_id']}",
                         headers=bearer(a[Role.WRITER])).status_code == 204
    assert [p.relative_to(blobs).parts[0] for p in blobs.rglob("*")
            if p.is_file() and ".incoming" not in p.parts] == ["blob-b"]


header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.builds(lambda s: f"Bearer {s}", st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)),
    st.builds(lambda key_id, secret: f"Bearer sluice_{key_id}_{secret}",
              st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
              st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                      min_size=43, max_size=43)),
)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(authorization=st.one_of(st.none(), header_values), data=st.data())
def test_any_credential_but_a_valid_key_is_401_everywhere(
    client: TestClient, authorization: str | None, data: st.DataObject
) -> None:
    from tests.api.test_auth import call, v1_routes

    method, path = data.draw(st.sampled_from(v1_routes(client.app)), label="route")
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = call(client, method, path, headers)
    assert resp.status_code == 401, (method, path, authorization, resp.text)
