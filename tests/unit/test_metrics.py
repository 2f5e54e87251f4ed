"""Metrics: label normalisation, counts taken by the stage runner, the multiprocess files of
several processes summed, and the gauges read from the job ledger.

In the test process prometheus_client runs in single-process mode, so counts are read from
its default registry as differences (other tests count too)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from api.metrics import UNMATCHED, method_label, route_label, status_label
from models import JobEvent, JobKind, JobState, Stage, ledger
from pipelines.errors import EmptyDocument, TransientError
from sluice import metrics
from sluice.db import read_scope, session_scope
from tasks.runner import Handoff, StageContext, run_stage
from tests.conftest import REPO


# Label normalisation ----------------------------------------------------------------------------
class _Route:
    def __init__(self, path_format: str, endpoint: object = None) -> None:
        self.path_format = path_format
        self.endpoint = endpoint


def test_route_label_is_the_template_never_the_raw_path() -> None:
    scope = {"path": "/v1/jobs/3f2a", "route": _Route("/v1/jobs/{job_id}")}
    assert route_label(scope) == "/v1/jobs/{job_id}"
    # No route matched (a scanner's random paths): one series for all of them.
    assert route_label({"path": "/wp-admin/setup.php"}) == UNMATCHED
    assert route_label({"path": "/x", "route": object()}) == UNMATCHED


def test_route_label_finds_plain_starlette_routes_by_endpoint() -> None:
    def openapi() -> None: ...

    routes = [_Route("/docs", endpoint=print), _Route("/openapi.json", endpoint=openapi)]
    assert route_label({"path": "/openapi.json", "endpoint": openapi}, routes) == "/openapi.json"
    assert route_label({"path": "/other", "endpoint": len}, routes) == UNMATCHED


def test_method_and_status_labels_are_bounded() -> None:
    assert method_label("get") == "GET"
    assert method_label("POST") == "POST"
    assert method_label("PROPFIND") == method_label("X" * 100) == "other"
    assert status_label(202) == "202"
    assert status_label(0) == status_label(1000) == "other"


# Through the app --------------------------------------------------------------------------------
def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_are_counted_by_route_template_and_uploads_with_bytes(
    sluice_env: dict[str, str],
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    job = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    unmatched = {"method": "GET", "route": UNMATCHED, "status": "404"}
    before = {
        "job": _sample("sluice_http_requests_total", **job),
        "job_hist": _sample("sluice_http_request_duration_seconds_count", **job),
        "unmatched": _sample("sluice_http_requests_total", **unmatched),
        "uploads": _sample("sluice_uploads_total", status="202"),
        "bytes": _sample("sluice_upload_bytes_total", status="202"),
    }
    body = b"a few words to index " * 50
    with TestClient(create_app()) as client:
        for ident in ("a", "b", "c"):
            assert client.get(f"/v1/jobs/{ident}").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        assert client.post("/v1/documents", files={"file": ("a.txt", body)}).status_code == 202
        exposition = client.get("/metrics")
    assert exposition.headers["content-type"].startswith("text/plain")
    assert _sample("sluice_http_requests_total", **job) - before["job"] == 3
    assert _sample("sluice_http_request_duration_seconds_count", **job) - before["job_hist"] == 3
    assert _sample("sluice_http_requests_total", **unmatched) - before["unmatched"] == 1
    assert _sample("sluice_uploads_total", status="202") - before["uploads"] == 1
    received = _sample("sluice_upload_bytes_total", status="202") - before["bytes"]
    assert len(body) < received < len(body) + 1024  # the file plus its multipart framing
    routes = {s.labels.get("route") for f in text_string_to_metric_families(exposition.text)
              for s in f.samples if f.name == "sluice_http_requests"}
    raw_paths = {"/v1/jobs/a", "/v1/jobs/b", "/v1/jobs/c", "/no/such/path"}
    assert routes and not routes & raw_paths  # templates, never the raw paths
    families = {f.name for f in text_string_to_metric_families(exposition.text)}
    assert {"sluice_queue_depth", "sluice_dead_letters", "sluice_ledger_up"} <= families


# The stage runner counts -----------------------------------------------------------------------
def _answer_job() -> str:
    from api.deps import ensure_workspace

    with session_scope() as session:
        ensure_workspace(session, "ws")
        return ledger.create_job(session, workspace_id="ws", kind=JobKind.ANSWER,
                                 stage=Stage.ANSWER, payload={"question": "q"}).id


def _finish(ctx: StageContext) -> Handoff:
    return ctx.finish(lambda session: ledger.succeed(session, ctx.claim, result={}))


def _transient(ctx: StageContext) -> Handoff:
    raise TransientError("the LLM is away", code="llm_unavailable")


def _permanent(ctx: StageContext) -> Handoff:
    raise EmptyDocument("nothing here")


@pytest.fixture
def fast_retries(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_RETRY_ANSWER__MAX_RETRIES", "1")
    monkeypatch.setenv("SLUICE_RETRY_ANSWER__BACKOFF_BASE_S", "0.01")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_stage_runner_counts_every_outcome_once(fast_retries: None) -> None:
    labels = {"kind": "answer", "queue": "answer"}
    coded = {**labels, "code": "llm_unavailable"}
    names = {
        "started": ("sluice_jobs_started_total", labels),
        "succeeded": ("sluice_jobs_succeeded_total", labels),
        "retried": ("sluice_jobs_retried_total", coded),
        "dead": ("sluice_jobs_dead_total", coded),
        "failed": ("sluice_jobs_failed_total", {**labels, "code": "empty_document"}),
        "observed": ("sluice_stage_duration_seconds_count", {"stage": "answer",
                                                             "queue": "answer"}),
    }
    before = {k: _sample(n, **lb) for k, (n, lb) in names.items()}

    def delta() -> dict[str, float]:
        return {k: _sample(n, **lb) - before[k] for k, (n, lb) in names.items()}

    ok = _answer_job()
    assert run_stage(job_id=ok, stage=Stage.ANSWER, work=_finish) == JobState.SUCCEEDED
    assert run_stage(job_id=ok, stage=Stage.ANSWER, work=_finish) == "ignored"  # duplicate
    doomed = _answer_job()
    assert run_stage(job_id=doomed, stage=Stage.ANSWER, work=_transient) == JobState.RETRYING
    assert run_stage(job_id=doomed, stage=Stage.ANSWER, work=_transient) == JobState.DEAD
    bad = _answer_job()
    assert run_stage(job_id=bad, stage=Stage.ANSWER, work=_permanent) == JobState.FAILED
    assert delta() == {"started": 4, "succeeded": 1, "retried": 1, "dead": 1, "failed": 1,
                       "observed": 4}


# Several processes, one directory -----------------------------------------------------------
COUNT_IN_A_CHILD = """
from sluice import metrics
metrics.job_started(kind="ingest", queue="parse")
metrics.stage_finished(stage="parse", queue="parse", seconds=0.2)
"""


def test_files_of_several_processes_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "metrics"
    env = {**os.environ, metrics.MULTIPROC_ENV: str(shared)}
    for _ in range(3):
        subprocess.run([sys.executable, "-c", COUNT_IN_A_CHILD], env=env, cwd=REPO, check=True)
    assert len(list(shared.glob("counter_*.db"))) == 3  # one file per process

    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(shared))
    families = {f.name: f for f in text_string_to_metric_families(
        metrics.exposition(ledger=False).decode())}
    started = families["sluice_jobs_started"].samples
    assert [(s.labels, s.value) for s in started if s.name.endswith("_total")] == [
        ({"kind": "ingest", "queue": "parse"}, 3.0)]
    counts = [s.value for s in families["sluice_stage_duration_seconds"].samples
              if s.name.endswith("_count")]
    assert counts == [3.0]

    metrics.reset_dir(shared)
    assert not list(shared.glob("*.db"))


def test_private_worker_directories_of_gone_workers_are_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"worker-{int(gone.stdout)}"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    alive = tmp_path / f"worker-{os.getppid()}"
    alive.mkdir()
    (tmp_path / "counter_2.db").write_bytes(b"")

    mine = metrics.private_dir(tmp_path, os.getpid())
    assert mine == tmp_path / f"worker-{os.getpid()}" and mine.is_dir()
    assert not stale.exists() and alive.exists()
    metrics.reset_dir(tmp_path)  # the shared files go, private directories stay
    assert not (tmp_path / "counter_2.db").exists() and mine.exists() and alive.exists()


# Gauges from the ledger ------------------------------------------------------------------------
def _gauges(now: datetime) -> dict[tuple[str, str], float]:
    with read_scope() as session:
        return {(f.name, s.labels.get("queue", "")): s.value
                for f in metrics.ledger_gauges(session, now=now) for s in f.samples}


def test_ledger_gauges_count_states_per_queue_and_age_the_oldest(
    any_db: dict[str, str],
) -> None:
    queued = [_answer_job(), _answer_job()]
    running = _answer_job()
    dead = _answer_job()
    with session_scope() as session:
        claim = ledger.start(session, job_id=running, stage=Stage.ANSWER, worker="w",
                             stale_before=datetime.now(UTC))
        assert claim is not None
        doomed = ledger.start(session, job_id=dead, stage=Stage.ANSWER, worker="w",
                              stale_before=datetime.now(UTC))
        assert doomed is not None
        assert ledger.retry_or_bury(session, doomed, max_retries=0, delay_s=0, code="x",
                                    message="y") == JobState.DEAD
        entered = datetime(2030, 1, 1, tzinfo=UTC)
        session.execute(update(JobEvent).where(JobEvent.job_id == queued[0])
                        .values(created_at=entered))
        session.execute(update(JobEvent).where(JobEvent.job_id == queued[1])
                        .values(created_at=entered + timedelta(seconds=30)))
        ledger.mark_published(session, queued[0])  # a (re)publish does not reset the age

    gauges = _gauges(now=entered + timedelta(seconds=90))
    assert gauges[("sluice_queue_depth", "answer")] == 2
    assert gauges[("sluice_queue_depth", "parse")] == 0
    assert gauges[("sluice_jobs_running", "answer")] == 1
    assert gauges[("sluice_jobs_retrying", "answer")] == 0
    assert gauges[("sluice_dead_letters", "answer")] == 1
    assert gauges[("sluice_queue_oldest_age_seconds", "answer")] == 90
    assert gauges[("sluice_queue_oldest_age_seconds", "embed")] == 0
