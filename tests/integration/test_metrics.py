"""`GET /metrics` after a small ingest through the real API and real Celery worker processes:
the workers' prefork children count into the shared multiprocess directory and the API sums
them, with the ledger's gauges; a worker with its own metrics port serves its own counts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluice.processes import child_env
from tests.conftest import DATA, REPO
from tests.stack import Stack, StackFactory, free_port

pytestmark = pytest.mark.integration

DOCS = DATA / "docs" / "unstructured"
GOOD = (DOCS / "book-war-and-peace-1p.txt", DOCS / "README.md")
EMPTY = DOCS / "empty.txt"  # fails permanently in parse: empty_document

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbs), v in samples.items() if n == name and want <= lbs)


def eventually(read: Callable[[], Samples], done: Callable[[Samples], bool],
               timeout: float = 30) -> Samples:
    # A job's new state commits a moment before the worker counts it.
    deadline = time.monotonic() + timeout
    samples = read()
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.3)
        samples = read()
    return samples


def test_metrics_count_a_small_ingest(
    sluice_env: dict[str, str], stack: StackFactory, data_dir: Path
) -> None:
    s = stack(sluice_env)
    uploads = [s.upload(path) for path in (*GOOD, EMPTY)]
    assert [u.status_code for u in uploads] == [202, 202, 202], [u.text for u in uploads]
    states = s.wait_jobs([u.json()["job_id"] for u in uploads], timeout=300)
    outcome = sorted((j["state"], (j.get("error") or {}).get("code")) for j in states.values())
    assert outcome == [("failed", "empty_document"), ("succeeded", None),
                       ("succeeded", None)], s.logs()

    m = eventually(lambda: scrape(f"{s.url}/metrics"),
                   lambda m: value(m, "sluice_jobs_succeeded_total") == 2
                   and value(m, "sluice_stage_duration_seconds_count") == 5)

    ingest = {"kind": "ingest"}
    assert value(m, "sluice_jobs_started_total", **ingest, queue="parse") == 3
    assert value(m, "sluice_jobs_started_total", **ingest, queue="embed") == 2
    assert value(m, "sluice_jobs_succeeded_total", **ingest, queue="embed") == 2
    assert value(m, "sluice_jobs_succeeded_total") == 2
    assert value(m, "sluice_jobs_failed_total", **ingest, queue="parse",
                 code="empty_document") == 1
    assert value(m, "sluice_jobs_failed_total") == 1
    assert value(m, "sluice_jobs_retried_total") == 0
    assert value(m, "sluice_jobs_dead_total") == 0

    parse = {"stage": "parse", "queue": "parse"}
    assert value(m, "sluice_stage_duration_seconds_count", **parse) == 3
    assert value(m, "sluice_stage_duration_seconds_bucket", **parse, le="+Inf") == 3
    assert value(m, "sluice_stage_duration_seconds_count", stage="embed", queue="embed") == 2
    assert value(m, "sluice_stage_duration_seconds_sum", **parse) > 0

    post = {"method": "POST", "route": "/v1/documents"}
    assert value(m, "sluice_http_requests_total", **post, status="202") == 3
    assert value(m, "sluice_http_requests_total", **post) == 3
    assert value(m, "sluice_http_request_duration_seconds_count", **post, status="202") == 3
    polls = value(m, "sluice_http_requests_total", method="GET", route="/v1/jobs/{job_id}",
                  status="200")
    assert polls >= 3  # wait_jobs polled each job at least once
    routes = {dict(lbs).get("route") for (n, lbs) in m if n == "sluice_http_requests_total"}
    assert not any(r and uploads[0].json()["job_id"] in r for r in routes)
    assert value(m, "sluice_uploads_total", status="202") == 3
    assert value(m, "sluice_upload_bytes_total", status="202") >= sum(
        p.stat().st_size for p in GOOD)

    for queue in ("parse", "embed", "answer"):
        assert value(m, "sluice_queue_depth", queue=queue) == 0
        assert value(m, "sluice_jobs_running", queue=queue) == 0
        assert value(m, "sluice_dead_letters", queue=queue) == 0
        assert value(m, "sluice_queue_oldest_age_seconds", queue=queue) == 0
    assert value(m, "sluice_ledger_up") == 1

    # The counts came from several processes through the shared directory.
    shared = Path(sluice_env["SLUICE_DATA_DIR"]) / "metrics"
    assert len(list(shared.glob("counter_*.db"))) >= 2


def test_worker_metrics_port_serves_its_own_counts(
    sluice_env: dict[str, str], stack: StackFactory, data_dir: Path, tmp_path: Path
) -> None:
    s: Stack = stack(sluice_env, workers=0)  # the API alone
    port = free_port()
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "worker", "-Q", "parse", "--metrics-port", str(port)],
        env={**child_env(sluice_env), "PYTHONUNBUFFERED": "1"}, cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        job_id = s.upload(EMPTY).json()["job_id"]
        job = s.wait_jobs([job_id], timeout=180)[job_id]
        assert job["state"] == "failed", (tmp_path / "worker.log").read_text()

        def own() -> Samples:
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except httpx.TransportError:
                return {}

        m = eventually(own, lambda m: value(m, "sluice_jobs_failed_total") == 1)
        assert value(m, "sluice_jobs_failed_total", kind="ingest", queue="parse",
                     code="empty_document") == 1
        assert value(m, "sluice_stage_duration_seconds_count", stage="parse") == 1
        # Served by the worker, not summed again by the API of this machine.
        api = scrape(f"{s.url}/metrics")
        assert value(api, "sluice_jobs_failed_total") == 0
        assert value(api, "sluice_http_requests_total", method="POST",
                     route="/v1/documents") == 1
        private = Path(sluice_env["SLUICE_DATA_DIR"]) / "metrics" / f"worker-{worker.pid}"
        assert list(private.glob("counter_*.db"))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
