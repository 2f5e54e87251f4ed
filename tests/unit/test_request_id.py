"""Request ids and log context: the middleware, the log filter and formatters, the ledger
and the publisher's choice of id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.testclient import TestClient

from api.request_id import RequestIdMiddleware, request_id_from
from models import JobKind, Stage, ledger
from sluice import logs
from sluice.db import session_scope


@pytest.fixture(autouse=True)
def _clean_context() -> Iterator[None]:
    logs.clear_context()
    yield
    logs.clear_context()


def test_request_id_from_header_or_generated() -> None:
    assert request_id_from([(b"x-request-id", b"abc-123.x:y")]) == "abc-123.x:y"
    generated = request_id_from([])
    assert len(generated) == 32 and int(generated, 16) >= 0
    for bad in (b"", b"a b", b"x" * 65, b"-leading", "é".encode(), b"a\nb"):
        replaced = request_id_from([(b"x-request-id", bad)])
        assert replaced != bad.decode("latin-1") and len(replaced) == 32


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger(f"test.request_id.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_bound_context() -> None:
    logger, stream = _capture(logs.JsonFormatter())
    token = logs.bind_context(request_id="r1", job_id="j1", document_id=None)
    logs.bind_context(stage="parse")
    logger.info("inside")
    logger.info("explicit", extra={"job_id": "j2"})
    logs.reset_context(token)
    logger.info("outside")
    inside, explicit, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "r1" and inside["job_id"] == "j1"
    assert inside["stage"] == "parse" and "document_id" not in inside
    assert explicit["job_id"] == "j2" and explicit["request_id"] == "r1"
    assert not {"request_id", "job_id", "stage"} & set(outside)


def test_plain_lines_end_with_the_context() -> None:
    logger, stream = _capture(logs.PlainFormatter())
    logs.bind_context(request_id="r1", job_id="j1")
    logger.info("hello")
    logs.clear_context()
    logger.info("bye")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("hello [request_id=r1 job_id=j1]")
    assert second.endswith("bye")


def test_middleware_sets_echoes_and_resets_the_request_id() -> None:
    app = FastAPI()
    seen: dict[str, str | None] = {}

    @app.get("/probe")
    async def probe() -> dict[str, str | None]:
        seen["route"] = logs.current_request_id()
        seen["thread"] = await run_in_threadpool(logs.current_request_id)
        return {}

    app.add_middleware(RequestIdMiddleware)
    with TestClient(app) as client:
        resp = client.get("/probe", headers={"X-Request-ID": "client-1"})
        assert resp.headers["x-request-id"] == "client-1"
        assert seen == {"route": "client-1", "thread": "client-1"}
        resp = client.get("/probe")
        assert seen["route"] == resp.headers["x-request-id"] and len(seen["route"] or "") == 32
    assert logs.current_request_id() is None


def test_create_job_takes_the_request_id_from_the_context(sluice_env: dict[str, str]) -> None:
    from tasks.publish import job_request_id

    logs.bind_context(request_id="req-ctx")
    with session_scope() as session:
        from_context = ledger.create_job(session, workspace_id=_workspace(session),
                                         kind=JobKind.ANSWER, stage=Stage.ANSWER).id
        explicit = ledger.create_job(session, workspace_id="default", kind=JobKind.ANSWER,
                                     stage=Stage.ANSWER, request_id="req-explicit").id
    logs.clear_context()
    with session_scope() as session:
        none = ledger.create_job(session, workspace_id="default", kind=JobKind.ANSWER,
                                 stage=Stage.ANSWER).id
    # publishing looks the id up on the row (the reconciler, a replay) ...
    assert job_request_id(from_context) == "req-ctx"
    assert job_request_id(explicit) == "req-explicit"
    assert job_request_id(none) is None
    # ... unless this is a task of that very job: then the id its message carried
    logs.bind_context(request_id="from-header", job_id=explicit)
    assert job_request_id(explicit) == "from-header"
    assert job_request_id(from_context) == "req-ctx"


def _workspace(session: object) -> str:
    from api.deps import ensure_workspace

    ensure_workspace(session, "default")  # type: ignore[arg-type]
    return "default"


def test_a_republished_message_carries_the_jobs_request_id(sluice_env: dict[str, str]) -> None:
    """As the reconciler republishes (no request in its context): the header comes from the
    job's row."""
    from tasks.publish import publish
    from workers.app import app

    with session_scope() as session:
        job_id = ledger.create_job(session, workspace_id=_workspace(session),
                                   kind=JobKind.ANSWER, stage=Stage.ANSWER,
                                   request_id="req-original").id
    logs.bind_context(request_id="reconciler-run")  # another task's context: not this job's
    assert publish(job_id, Stage.ANSWER)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("answer")
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.headers["request_id"] == "req-original"
    assert message.headers["argsrepr"] == repr([job_id])
