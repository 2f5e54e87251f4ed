"""Prometheus metrics: job and stage metrics counted by workers, gauges read from the job
ledger at scrape time, and the plumbing that makes prefork workers scrapeable.

Celery's prefork children are separate processes, so the counters live in prometheus_client's
**multiprocess mode**: with `PROMETHEUS_MULTIPROC_DIR` set before prometheus_client is imported,
every process writes its samples to memory-mapped files `<type>_<pid>.db` in that directory,
and a scrape sums the files of all processes, dead ones included (a counter never goes back
because a child was recycled). The launchers set the variable: `sluice up` and the test stack
(`sluice.processes.child_env`) point every process of one machine at `metrics_dir`, which the
supervisor empties at start, so the API's `/metrics` shows the workers' counters too;
`sluice worker --metrics-port N` (workers on another machine) gives its worker a private
directory and serves it from the worker's main process. Without the variable a process keeps
its metrics in memory (one process: fine for the API, useless for prefork workers).

Counts are taken after the transaction that makes the transition commits, in the stage runner
(`tasks.runner`): a rolled-back transition is never counted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY as PROCESS_REGISTRY
from prometheus_client import Counter, Histogram, multiprocess
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The directory this process's prometheus_client writes to, or None in single-process
    mode. (prometheus_client reads its own variable when imported; this is the one other
    place that looks at it.)"""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


# The directory must exist before the first sample is written; a launcher normally made it.
if (_dir := multiprocess_dir()) is not None:
    _dir.mkdir(parents=True, exist_ok=True)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

# Stages run from milliseconds (a short text) to minutes (a long PDF, a big embed batch).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS_STARTED = Counter(
    "sluice_jobs_started", "Stage attempts started (claimed by a worker), retries included.",
    ("kind", "queue"))
JOBS_SUCCEEDED = Counter(
    "sluice_jobs_succeeded", "Jobs that succeeded, counted on the queue of their last stage.",
    ("kind", "queue"))
JOBS_FAILED = Counter(
    "sluice_jobs_failed", "Jobs failed by a permanent error (never retried), by error code.",
    ("kind", "queue", "code"))
JOBS_RETRIED = Counter(
    "sluice_jobs_retried", "Attempts that failed transiently and were scheduled for a retry.",
    ("kind", "queue", "code"))
JOBS_DEAD = Counter(
    "sluice_jobs_dead", "Jobs dead-lettered because their retries ran out.",
    ("kind", "queue", "code"))
STAGE_DURATION = Histogram(
    "sluice_stage_duration_seconds",
    "Time one stage attempt ran in the worker (claim to recorded outcome), whatever the "
    "outcome; attempts killed by a hard time limit are not observed.",
    ("stage", "queue"), buckets=STAGE_BUCKETS)

_OUTCOMES: dict[str, Counter] = {"succeeded": JOBS_SUCCEEDED, "failed": JOBS_FAILED,
                                 "retrying": JOBS_RETRIED, "dead": JOBS_DEAD}


# Recording (called by tasks.runner) ----------------------------------------------------------
def job_started(*, kind: str, queue: str) -> None:
    JOBS_STARTED.labels(kind=kind, queue=queue).inc()


def job_outcome(*, kind: str, queue: str, state: str, code: str | None = None) -> None:
    """Count a committed transition to succeeded, failed, retrying or dead (others are not
    counted here)."""
    counter = _OUTCOMES.get(str(state))
    if counter is None:
        return
    if counter is JOBS_SUCCEEDED:
        counter.labels(kind=kind, queue=queue).inc()
    else:
        counter.labels(kind=kind, queue=queue, code=code or "unknown").inc()


def stage_finished(*, stage: str, queue: str, seconds: float) -> None:
    STAGE_DURATION.labels(stage=stage, queue=queue).observe(seconds)


# The multiprocess directory -------------------------------------------------------------------
def metrics_dir(settings: Settings) -> Path:
    """Where this machine's processes write their metric files (`SLUICE_METRICS_DIR`,
    default `data_dir/metrics`)."""
    return (settings.metrics_dir or settings.resolved_data_dir / "metrics").expanduser().resolve()


def reset_dir(path: Path) -> None:
    """Start a fresh set of processes: forget the files of earlier runs (their counters
    restart at zero, which Prometheus reads as a reset). Private worker directories below are
    left to their owners."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


_PRIVATE = re.compile(r"^worker-(\d+)$")


def private_dir(base: Path, pid: int) -> Path:
    """A fresh directory for the worker whose main process is `pid` (it serves its own
    metrics); directories of workers that are gone are removed."""
    base.mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():
        match = _PRIVATE.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    path = base / f"worker-{pid}"
    shutil.rmtree(path, ignore_errors=True)  # a reused pid: not ours
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_process_dead(pid: int) -> None:
    """A process of this machine exited: drop its live-gauge files (its counters stay)."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, str(path))


# Scrape-time gauges from the job ledger --------------------------------------------------------
class LedgerCollector:
    """Queue depth, age of the oldest queued job, running, retrying and dead jobs per queue,
    read from the database at each scrape (the ledger, not the broker, is the truth)."""

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from sluice.db import read_scope

        up = GaugeMetricFamily("sluice_ledger_up",
                               "1 when the job ledger could be read for this scrape.")
        try:
            with read_scope() as session:
                metrics = list(ledger_gauges(session, now=datetime.now(UTC)))
        except SQLAlchemyError as exc:
            log.warning("metrics: the job ledger could not be read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics


def ledger_gauges(session: Session, *, now: datetime) -> Iterator[GaugeMetricFamily]:
    from sqlalchemy import func, select

    from models import Job, JobEvent, JobState
    from tasks.names import QUEUE_OF_TASK, TASK_OF_STAGE

    queue_of_stage = {stage: QUEUE_OF_TASK[task] for stage, task in TASK_OF_STAGE.items()}
    queues = sorted(set(queue_of_stage.values()))
    counted = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.DEAD)
    counts = {(queue, str(state)): 0 for queue in queues for state in counted}
    for stage, state, n in session.execute(
        select(Job.stage, Job.state, func.count()).where(Job.state.in_(counted))
        .group_by(Job.stage, Job.state)
    ):
        key = (queue_of_stage.get(stage, stage), str(state))
        counts[key] = counts.get(key, 0) + n

    # A queued job entered its state at its newest event (every transition appends one;
    # publishing does not, so a republished job keeps its age).
    entered = (select(func.max(JobEvent.created_at)).where(JobEvent.job_id == Job.id)
               .correlate(Job).scalar_subquery())
    oldest: dict[str, float] = dict.fromkeys(queues, 0.0)
    for stage, since in session.execute(
        select(Job.stage, func.min(entered)).where(Job.state == JobState.QUEUED)
        .group_by(Job.stage)
    ):
        if since is None:
            continue
        since = since if since.tzinfo else since.replace(tzinfo=UTC)  # SQLite: naive UTC
        queue = queue_of_stage.get(stage, stage)
        oldest[queue] = max(oldest.get(queue, 0.0), (now - since).total_seconds())

    families = {
        JobState.QUEUED: GaugeMetricFamily(
            "sluice_queue_depth", "Jobs queued (waiting for a worker) per queue.",
            labels=["queue"]),
        JobState.RUNNING: GaugeMetricFamily(
            "sluice_jobs_running", "Jobs running per queue.", labels=["queue"]),
        JobState.RETRYING: GaugeMetricFamily(
            "sluice_jobs_retrying", "Jobs waiting for a retry after a transient failure.",
            labels=["queue"]),
        JobState.DEAD: GaugeMetricFamily(
            "sluice_dead_letters", "Dead jobs (retries ran out) not yet replayed or discarded.",
            labels=["queue"]),
    }
    for (queue, state), n in sorted(counts.items()):
        families[JobState(state)].add_metric([queue], n)
    yield from families.values()
    age = GaugeMetricFamily("sluice_queue_oldest_age_seconds",
                            "Seconds the oldest queued job of a queue has waited (0 when empty).",
                            labels=["queue"])
    for queue, seconds in sorted(oldest.items()):
        age.add_metric([queue], max(0.0, seconds))
    yield age


# Exposition -----------------------------------------------------------------------------------
class _Merged:
    """Every process's samples: the multiprocess files, or this process's own registry."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        if self.path is None:
            return PROCESS_REGISTRY.collect()
        files = [str(p) for p in self.path.glob("*.db")]
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


class _Combined:
    def __init__(self, *parts: Collector) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


def exposition(*, ledger: bool) -> bytes:
    """The text exposition of every process of this machine (plus the ledger gauges)."""
    parts: list[Collector] = [_Merged(multiprocess_dir())]
    if ledger:
        parts.append(LedgerCollector())
    return generate_latest(_Combined(*parts))


def start_exporter(port: int, addr: str = "0.0.0.0") -> None:
    """Serve this machine's (or this worker's) multiprocess files over HTTP from a thread of
    the calling process: the Celery main process of `sluice worker --metrics-port`."""
    path = multiprocess_dir()
    if path is None:
        raise RuntimeError(f"a worker metrics port needs {MULTIPROC_ENV} (multiprocess mode): "
                           "start the worker with `sluice worker --metrics-port`")
    start_http_server(port, addr=addr, registry=_Merged(path))
    log.info("metrics of %s served on %s:%d", path, addr, port)
