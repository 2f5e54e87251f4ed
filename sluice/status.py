"""The state of the system, in one place: is the database reachable and migrated, is the
broker reachable, which workers serve each queue and what they run, how deep each queue is and
how many jobs are dead. `/readyz` asks for readiness only; `sluice status` for everything.

Queue depths come from the job ledger (the source of truth), not from the broker: a job is
waiting on a queue when it is `queued` (or `retrying`) at a stage that queue runs. Workers are
asked over Celery's remote control (a broadcast that works on every broker we support,
including the embedded filesystem one); a broadcast waits its whole timeout for replies, so
readiness caches the answer for a few seconds and concurrent probes share one broadcast.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from models.entities import Job, JobEvent, JobState
from tasks.names import QUEUE_OF_TASK, QUEUES, STAGE_OF_TASK, TASK_OF_STAGE

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

INSPECT_TIMEOUT_S = 1.0  # how long a broadcast waits for workers' replies
WORKER_CACHE_S = 3.0  # how long readiness reuses one broadcast's answer
BROKER_CONNECT_TIMEOUT_S = 2.0
RUNNING_JOBS_SHOWN = 200


@dataclass
class DatabaseCheck:
    ok: bool
    revision: str | None = None
    head: str | None = None
    error: str | None = None


@dataclass
class BrokerCheck:
    ok: bool
    error: str | None = None


@dataclass
class ActiveTask:
    task_id: str
    task: str
    job_id: str | None
    stage: str | None


@dataclass
class WorkerInfo:
    hostname: str
    queues: list[str]
    active: list[ActiveTask] | None = None  # None: not asked (readiness does not)


@dataclass
class WorkerObservation:
    """One broadcast's answer: the broker's state and the workers that replied."""

    broker: BrokerCheck
    workers: dict[str, WorkerInfo]
    observed_at: datetime


@dataclass
class QueueReadiness:
    ready: bool
    workers: list[str]


@dataclass
class Readiness:
    ready: bool
    database: DatabaseCheck
    broker: BrokerCheck
    queues: dict[str, QueueReadiness]
    workers_observed_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QueueStats:
    workers: list[str] = field(default_factory=list)
    queued: int = 0
    retrying: int = 0
    running: int = 0
    depth: int = 0  # queued + retrying: jobs waiting for a worker of this queue
    oldest_queued_age_s: float | None = None


@dataclass
class RunningJob:
    job_id: str
    kind: str
    stage: str
    attempt: int
    worker: str | None
    worker_answering: bool
    document_id: str | None
    request_id: str | None
    started_at: str | None
    heartbeat_age_s: float | None


@dataclass
class SystemStatus:
    ready: bool
    database: DatabaseCheck
    broker: BrokerCheck
    queues: dict[str, QueueStats]
    workers: list[WorkerInfo]
    running_jobs: list[RunningJob]
    running_total: int
    dead_letters: int
    observed_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Checks ----------------------------------------------------------------------------------------
def _error(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:200]}".rstrip(": ")


@lru_cache(maxsize=1)
def _head_revision() -> str | None:
    from sluice import migrate

    return migrate.head_revision()


def check_database() -> DatabaseCheck:
    """Reachable, and at the newest migration. (On SQLite, a deferred transaction: a probe
    never waits for the write lock.)"""
    from alembic.runtime.migration import MigrationContext

    from sluice.db import get_engine

    head = _head_revision()
    try:
        engine = get_engine().execution_options(sqlite_begin="DEFERRED")
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            revision = MigrationContext.configure(connection).get_current_revision()
    except (SQLAlchemyError, OSError) as exc:
        return DatabaseCheck(ok=False, head=head, error=_error(exc))
    if revision != head:
        return DatabaseCheck(ok=False, revision=revision, head=head,
                             error=f"schema at {revision}, code expects {head}: run "
                                   "`sluice migrate`")
    return DatabaseCheck(ok=True, revision=revision, head=head)


def _active_task(entry: dict[str, Any]) -> ActiveTask:
    task = str(entry.get("name") or entry.get("type") or "")
    args = entry.get("args")
    job_id = str(args[0]) if isinstance(args, list | tuple) and args else None
    stage = STAGE_OF_TASK.get(task)
    return ActiveTask(task_id=str(entry.get("id")), task=task,
                      job_id=job_id if stage else None, stage=stage)


def observe_workers(app: Celery, *, timeout: float = INSPECT_TIMEOUT_S,
                    with_active: bool = False) -> WorkerObservation:
    """Connect to the broker, then broadcast `active_queues` (and `active`) to the workers
    and gather the replies that arrive within `timeout`."""
    now = datetime.now(UTC)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5,
                                         timeout=BROKER_CONNECT_TIMEOUT_S)
            inspect = app.control.inspect(timeout=timeout, connection=connection)
            queues = inspect.active_queues() or {}
            active = (inspect.active() or {}) if with_active else {}
    except Exception as exc:  # noqa: BLE001 - any broker failure is "not reachable", reported
        return WorkerObservation(broker=BrokerCheck(ok=False, error=_error(exc)), workers={},
                                 observed_at=now)
    workers = {
        hostname: WorkerInfo(
            hostname=hostname,
            queues=sorted(str(q.get("name")) for q in replies or []),
            active=[_active_task(t) for t in active.get(hostname) or []] if with_active else None,
        )
        for hostname, replies in queues.items()
    }
    return WorkerObservation(broker=BrokerCheck(ok=True), workers=workers, observed_at=now)


class CachedWorkerProbe:
    """`observe_workers` at most once per `ttl_s`; callers arriving during a broadcast wait
    for it and share its answer, so probes cannot flood the broker."""

    def __init__(self, app: Celery | None = None, *, ttl_s: float = WORKER_CACHE_S,
                 timeout: float = INSPECT_TIMEOUT_S) -> None:
        self._app = app
        self.ttl_s = ttl_s
        self.timeout = timeout
        self._lock = threading.Lock()
        self._cached: tuple[float, WorkerObservation] | None = None

    def observe(self) -> WorkerObservation:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl_s:
                return self._cached[1]
            observation = observe_workers(self._app or _celery_app(), timeout=self.timeout)
            self._cached = (time.monotonic(), observation)
            return observation


def _celery_app() -> Celery:
    from workers.app import app

    return app


def _queue_workers(workers: dict[str, WorkerInfo]) -> dict[str, list[str]]:
    return {q: sorted(h for h, w in workers.items() if q in w.queues) for q in QUEUES}


def readiness(probe: CachedWorkerProbe) -> Readiness:
    """Ready: the database is reachable and migrated, the broker is reachable, and at least
    one worker answers for every queue."""
    database = check_database()
    observation = probe.observe()
    queues = {q: QueueReadiness(ready=bool(hosts), workers=hosts)
              for q, hosts in _queue_workers(observation.workers).items()}
    ready = database.ok and observation.broker.ok and all(q.ready for q in queues.values())
    return Readiness(ready=ready, database=database, broker=observation.broker, queues=queues,
                     workers_observed_at=observation.observed_at.isoformat())


# Ledger ----------------------------------------------------------------------------------------
def queue_of_stage(stage: str) -> str:
    task = TASK_OF_STAGE.get(stage)
    return QUEUE_OF_TASK.get(task, stage) if task else stage


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything stored is UTC.
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def queue_stats(session: Session, *, now: datetime) -> dict[str, QueueStats]:
    """Jobs waiting, retrying and running per queue, and how long the oldest has waited.

    A queued job has waited since it entered the state (its newest event; `updated_at` also
    moves when the reconciler republishes it); a retrying job counts once its backoff is due."""
    queued_since = (
        select(JobEvent.created_at).where(JobEvent.job_id == Job.id)
        .order_by(JobEvent.id.desc()).limit(1).correlate(Job).scalar_subquery()
    )
    waiting_since = case(
        (Job.state == JobState.QUEUED, func.coalesce(queued_since, Job.updated_at)),
        (Job.state == JobState.RETRYING, Job.retry_at),
        else_=None,
    )
    rows = session.execute(
        select(Job.stage, Job.state, func.count(), func.min(waiting_since))
        .where(Job.state.in_((JobState.QUEUED, JobState.RETRYING, JobState.RUNNING)))
        .group_by(Job.stage, Job.state)
    ).all()
    stats = {q: QueueStats() for q in QUEUES}
    for stage, state, count, since in rows:
        entry = stats.setdefault(queue_of_stage(stage), QueueStats())
        setattr(entry, str(state), getattr(entry, str(state)) + count)
        since = _aware(since)
        if state != JobState.RUNNING and since is not None and since <= now:
            age = round((now - since).total_seconds(), 3)
            if entry.oldest_queued_age_s is None or age > entry.oldest_queued_age_s:
                entry.oldest_queued_age_s = age
    for entry in stats.values():
        entry.depth = entry.queued + entry.retrying
    return stats


def running_jobs(session: Session, *, now: datetime, answering: set[str],
                 limit: int = RUNNING_JOBS_SHOWN) -> tuple[list[RunningJob], int]:
    """The ledger's running jobs with the worker that claimed each (longest running first),
    and how many there are in all."""
    total = session.scalar(select(func.count()).select_from(Job)
                           .where(Job.state == JobState.RUNNING)) or 0
    jobs = session.scalars(
        select(Job).where(Job.state == JobState.RUNNING).order_by(Job.started_at).limit(limit)
    ).all()
    shown = []
    for job in jobs:
        heartbeat = _aware(job.heartbeat_at)
        started = _aware(job.started_at)
        shown.append(RunningJob(
            job_id=job.id, kind=job.kind, stage=job.stage, attempt=job.attempt,
            worker=job.worker, worker_answering=job.worker in answering,
            document_id=job.document_id, request_id=job.request_id,
            started_at=started.isoformat() if started else None,
            heartbeat_age_s=round((now - heartbeat).total_seconds(), 3) if heartbeat else None,
        ))
    return shown, total


def dead_letter_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.state == JobState.DEAD)) or 0


def system_status(app: Celery | None = None, *, timeout: float = INSPECT_TIMEOUT_S
                  ) -> SystemStatus:
    """Everything `sluice status` shows (never cached)."""
    from sluice.db import read_scope

    database = check_database()
    observation = observe_workers(app or _celery_app(), timeout=timeout, with_active=True)
    now = datetime.now(UTC)
    stats: dict[str, QueueStats] = {q: QueueStats() for q in QUEUES}
    running: list[RunningJob] = []
    running_total = dead = 0
    try:
        with read_scope() as session:
            stats = queue_stats(session, now=now)
            running, running_total = running_jobs(session, now=now,
                                                  answering=set(observation.workers))
            dead = dead_letter_count(session)
    except SQLAlchemyError as exc:  # unreachable or not migrated: already not ok
        database.error = database.error or _error(exc)
    for queue, hosts in _queue_workers(observation.workers).items():
        stats.setdefault(queue, QueueStats()).workers = hosts
    ready = (database.ok and observation.broker.ok
             and all(stats[q].workers for q in QUEUES))
    return SystemStatus(
        ready=ready, database=database, broker=observation.broker, queues=stats,
        workers=sorted(observation.workers.values(), key=lambda w: w.hostname),
        running_jobs=running, running_total=running_total, dead_letters=dead,
        observed_at=now.isoformat(),
    )
