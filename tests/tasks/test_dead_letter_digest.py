"""The dead-letter digest on SQLite and PostgreSQL: counts by queue and error code, what is
new since the last digest, one structured log line, and a webhook that is posted when
something new died and whose failure never raises."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from models import Job, JobKind, JobState, Stage, Workspace
from models.entities import utcnow
from sluice.db import session_scope
from sluice.settings import get_settings
from tasks.maintenance import dead_letter_digest
from tests.stack import free_port


class Hook:
    def __init__(self, status: int) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []


@pytest.fixture
def hook() -> Iterator[tuple[str, Hook]]:
    """A real HTTP endpoint on localhost that records what is posted to it."""
    state = Hook(status=204)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append(json.loads(body))
            self.send_response(state.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/dlq", state
    server.shutdown()
    server.server_close()


def _use_webhook(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("SLUICE_DEAD_LETTER_WEBHOOK_URL", url)
    monkeypatch.setenv("SLUICE_DEAD_LETTER_WEBHOOK_TIMEOUT_S", "2")
    get_settings.cache_clear()


def _job(state: JobState, stage: Stage, code: str, workspace: str = "ws") -> str:
    with session_scope() as session:
        if session.get(Workspace, workspace) is None:
            session.add(Workspace(id=workspace))
            session.flush()
        kind = JobKind.ANSWER if stage == Stage.ANSWER else JobKind.INGEST
        job = Job(workspace_id=workspace, kind=kind, stage=stage, state=state, error_code=code,
                  finished_at=utcnow())
        session.add(job)
        session.flush()
        return job.id


def _digest_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
        "dead_letter_digest ")]
    assert len(lines) == 1, lines
    caplog.clear()
    parsed: dict[str, Any] = json.loads(lines[0].split(" ", 1)[1])
    return parsed


def test_digest_counts_new_since_last_and_posts_only_news(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    hook: tuple[str, Hook],
) -> None:
    url, received = hook
    _use_webhook(monkeypatch, url)
    caplog.set_level(logging.INFO, logger="tasks.digest")

    empty = dead_letter_digest()
    assert (empty["total"], empty["new"], empty["webhook"]) == (0, 0, None)
    assert _digest_line(caplog)["total"] == 0
    assert received.received == []

    for _ in range(2):
        _job(JobState.DEAD, Stage.PARSE, "timeout")
    _job(JobState.DEAD, Stage.EMBED, "database_unavailable", workspace="other")
    _job(JobState.DEAD, Stage.ANSWER, "unexpected_error")
    _job(JobState.FAILED, Stage.PARSE, "corrupt_file")  # failed, not dead: not a dead letter
    _job(JobState.SUCCEEDED, Stage.EMBED, "")

    first = dead_letter_digest()
    assert (first["total"], first["new"], first["webhook"]) == (4, 4, "sent")
    assert first["by_queue"] == {"parse": {"total": 2, "new": 2}, "embed": {"total": 1, "new": 1},
                                 "answer": {"total": 1, "new": 1}}
    assert first["by_error"][0] == {"queue": "parse", "stage": "parse", "error_code": "timeout",
                                    "total": 2, "new": 2}
    logged = _digest_line(caplog)
    assert (logged["total"], logged["new"], logged["by_queue"]) == (4, 4, first["by_queue"])
    assert len(received.received) == 1
    posted = received.received[0]
    assert posted["event"] == "dead_letter_digest" and posted["by_queue"] == first["by_queue"]

    second = dead_letter_digest()  # nothing died since: reported, not posted again
    assert (second["total"], second["new"], second["webhook"]) == (4, 0, None)
    assert second["since"] == first["as_of"]
    assert _digest_line(caplog)["new"] == 0
    assert len(received.received) == 1

    _job(JobState.DEAD, Stage.EMBED, "timeout")
    third = dead_letter_digest()
    assert (third["total"], third["new"], third["webhook"]) == (5, 1, "sent")
    assert third["by_queue"]["embed"] == {"total": 2, "new": 1}
    assert len(received.received) == 2


@pytest.mark.parametrize("failure", ["http_500", "refused", "bad_url"])
def test_webhook_failure_never_raises(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch, hook: tuple[str, Hook],
    failure: str,
) -> None:
    url, received = hook
    if failure == "http_500":
        received.status = 500
    elif failure == "refused":
        url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    else:
        url = "not a url at all"
    _use_webhook(monkeypatch, url)
    _job(JobState.DEAD, Stage.PARSE, "timeout")

    result = dead_letter_digest()
    assert result["total"] == 1 and result["new"] == 1
    assert result["webhook"].startswith("failed: ")
    # The run still completed and was recorded: the next digest has nothing new.
    assert dead_letter_digest()["new"] == 0
