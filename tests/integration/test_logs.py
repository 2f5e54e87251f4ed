"""Correlated logs: one request id, given by the client, follows a document from upload to
ready through the API's and the worker's JSON log lines (and a question to its answer)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, StackFactory

pytestmark = pytest.mark.integration


def _json_lines(s: Stack, name: str) -> list[dict[str, Any]]:
    entries = []
    for line in s.log(name).splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def test_request_id_follows_upload_through_every_stage(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    s = stack({**sluice_env, "SLUICE_LOG_JSON": "1"})
    request_id = f"itest-{uuid.uuid4().hex[:12]}"
    path = tmp_path / "gate.txt"
    path.write_text("The sluice gate opens at dawn and closes at dusk.\n\n"
                    "Its keeper logs every opening in a ledger.\n")
    with s.client() as client, path.open("rb") as fh:
        resp = client.post("/v1/documents", files={"file": (path.name, fh)},
                           headers={"X-Request-ID": request_id})
    assert resp.status_code == 202, resp.text
    assert resp.headers["X-Request-ID"] == request_id
    job_id, document_id = resp.json()["job_id"], resp.json()["document_id"]
    assert s.wait_jobs([job_id])[job_id]["state"] == "succeeded", s.logs()

    with s.client() as client:
        answer = client.post("/v1/answers", params={"wait": 120},
                             json={"question": "When does the sluice gate open?"},
                             headers={"X-Request-ID": f"{request_id}-ask"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-ID"] == f"{request_id}-ask"
        # A request without an id gets a fresh one; a malformed one is replaced.
        generated = client.get("/healthz").headers["X-Request-ID"]
        replaced = client.get("/healthz", headers={"X-Request-ID": "a b\tc"})
    assert len(generated) == 32 and replaced.headers["X-Request-ID"] != "a b\tc"
    s.stop()  # flush and close the logs

    api = [e for e in _json_lines(s, "api") if e.get("request_id") == request_id]
    assert any(e.get("job_id") == job_id and e.get("document_id") == document_id
               for e in api), s.log("api")
    assert any(e["logger"] == "api.requests" and "POST /v1/documents 202" in e["msg"]
               for e in api)

    worker = [e for e in _json_lines(s, "worker0") if e.get("request_id") == request_id]
    for stage in ("parse", "embed"):
        lines = [e for e in worker if e.get("stage") == stage]
        # Celery's own line for the task, logged inside it, carries the whole context
        assert any(e["logger"] == "celery.app.trace" and f"{stage}_document[" in e["msg"]
                   and e.get("document_id") == document_id for e in lines), \
            (stage, s.log("worker0")[-5000:])
        assert all(e["job_id"] == job_id for e in lines)
    # the parse stage handed off to embed with the same id (the publish line)
    assert any(e["msg"] == f"job {job_id}: embed published" for e in worker)

    asked = [e for e in _json_lines(s, "worker0") if e.get("request_id") == f"{request_id}-ask"]
    assert any(e["logger"] == "celery.app.trace" and "answer_question[" in e["msg"]
               for e in asked)
    assert all(e.get("stage") == "answer" for e in asked)
