"""The seven fault scenarios. Each takes a stack factory, a base environment (isolated data
dir, tagger) and a document count, and returns an Outcome (lost and duplicated must be 0)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from sqlalchemy import select

from models import Job, JobAttempt
from sluice.db import session_scope
from tests.conftest import _apply_env
from tests.faults.harness import (
    FAST_CLOCKS,
    Killer,
    Outcome,
    drain,
    make_corpus,
    own_postgres,
    own_redis,
    submit,
    tally,
    unique_prefix,
)
from tests.stack import StackFactory

# A 109 kB spreadsheet whose shared strings expand without end: minutes of parsing and
# gigabytes of memory unless a limit stops it.
RUNAWAY_XLSX = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hostile"
                / "office" / "apache-poi" / "spreadsheet" / "poc-shared-strings.xlsx")


def _configure(monkeypatch, env: dict[str, str]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from sluice import migrate
    from sluice.db import get_engine
    from workers.app import reconfigure

    env = {**env, **FAST_CLOCKS}
    _apply_env(monkeypatch, env)
    migrate.upgrade(get_engine())
    reconfigure()
    return env


def sigkill_workers(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                    monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """SIGKILL worker pool processes again and again while documents are ingested."""
    env = _configure(monkeypatch, env)
    s = stack(env, workers=2, concurrency=1, beat=True)
    files = make_corpus(tmp / "corpus", docs)
    started = time.monotonic()
    job_ids = submit(s, files)
    killer = Killer(s, kills=max(3, docs // 10), interval_s=1.5)
    killer.start()
    states = drain(job_ids, timeout=120 + docs * 2)
    killer.stop_event.set()
    outcome = tally("sigkill_workers", job_ids, states, started)
    outcome.other["kills"] = killer.done
    return outcome


def redis_wiped(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """Restart the broker with its data wiped in the middle of a run."""
    with own_redis() as (url, restart_wiped):
        env = _configure(monkeypatch, {**env, "SLUICE_BROKER_URL": url,
                                       "SLUICE_BROKER_KEY_PREFIX": unique_prefix()})
        s = stack(env, workers=1, concurrency=2, beat=True)
        files = make_corpus(tmp / "corpus", docs)
        started = time.monotonic()
        job_ids = submit(s, files)
        _wait_some_done(job_ids, fraction=0.2)
        restart_wiped()
        states = drain(job_ids, timeout=120 + docs * 2)
        return tally("redis_wiped", job_ids, states, started)


def postgres_restarted(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                       monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """Restart the database in the middle of a run."""
    with own_postgres() as (url, restart):
        env = _configure(monkeypatch, {**env, "SLUICE_DATABASE_URL": url})
        s = stack(env, workers=1, concurrency=2, beat=True)
        files = make_corpus(tmp / "corpus", docs)
        started = time.monotonic()
        job_ids = submit(s, files)
        _wait_some_done(job_ids, fraction=0.2)
        restart(3.0)
        states = drain(job_ids, timeout=150 + docs * 2)
        return tally("postgres_restarted", job_ids, states, started)


def always_transient(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                     monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """Embedding always fails (its model is missing): dead after exactly max retries with every
    attempt recorded; with the cause removed, a replay succeeds."""
    max_retries = 2
    env = _configure(monkeypatch, {**env, "SLUICE_RETRY_EMBED__MAX_RETRIES": str(max_retries)})
    broken = stack({**env, "SLUICE_EMBEDDING_MODEL_PATH": str(tmp / "no-such-model")},
                   workers=1, concurrency=2, beat=True)
    files = make_corpus(tmp / "corpus", docs)
    started = time.monotonic()
    job_ids = submit(broken, files)
    states = drain(job_ids, timeout=120 + docs * 3)
    outcome = tally("always_transient", job_ids, states, started, expected_dead=len(job_ids))
    with session_scope() as session:
        attempts = session.execute(
            select(JobAttempt.job_id, JobAttempt.stage, JobAttempt.outcome,
                   JobAttempt.traceback).where(JobAttempt.job_id.in_(job_ids))).all()
    embed = [a for a in attempts if a.stage == "embed"]
    outcome.other["embed_attempts_per_job"] = len(embed) // max(1, len(job_ids))
    outcome.other["attempts_without_traceback"] = sum(1 for a in embed if not a.traceback)
    broken.stop()
    fixed = stack(env, workers=1, concurrency=2, beat=True)
    with fixed.client() as client:
        replayed = client.post("/v1/dead-letters/replay", params={"queue": "embed"}).json()
    outcome.other["replayed"] = len(replayed["replayed"])
    after = drain(job_ids, timeout=120 + docs * 2)
    outcome.other["succeeded_after_replay"] = sum(1 for s in after.values() if s == "succeeded")
    outcome.lost = len(job_ids) - sum(1 for j in job_ids if after.get(j) in ("succeeded",
                                                                            "failed", "dead"))
    return outcome


def hard_time_limit(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                    monkeypatch, slow: int = 1) -> Outcome:  # type: ignore[no-untyped-def]
    """`slow` runaway parses (a hostile spreadsheet) over their hard time limit (no soft limit,
    so the child is killed) among `docs` normal documents: the runaways are retried, then dead
    with `timeout`; the normal ones succeed."""
    max_retries = 1
    env = _configure(monkeypatch, {
        **env, "SLUICE_PARSE_SOFT_TIME_LIMIT_S": "none",
        # 60 s: the runaway never ends, and a normal document's first parse in a cold pool
        # child took 31 s on this 2-core machine under a load of 12 (40 s cut one short).
        "SLUICE_PARSE_TIME_LIMIT_S": "60",
        # No memory cap: the runaway must run into the hard time limit, not the sandbox's cap.
        "SLUICE_PARSE_MEMORY_LIMIT_MB": "none",
        "SLUICE_RETRY_PARSE__MAX_RETRIES": str(max_retries),
    })
    s = stack(env, workers=1, concurrency=2, beat=True)
    started = time.monotonic()
    slow_ids = []
    with s.client() as client:
        for i in range(slow):  # the same bytes again: force a new document each time
            resp = client.post("/v1/documents", params={"force": "true"},
                               files={"file": (f"runaway-{i}.xlsx", RUNAWAY_XLSX.read_bytes())})
            slow_ids.append(resp.json()["job_id"])
    normal_ids = submit(s, make_corpus(tmp / "corpus", docs))
    job_ids = slow_ids + normal_ids
    states = drain(job_ids, timeout=180 + docs * 2 + slow * 200)
    outcome = tally("hard_time_limit", job_ids, states, started, expected_dead=len(slow_ids))
    with session_scope() as session:
        codes = session.scalars(select(Job.error_code).where(Job.id.in_(slow_ids))).all()
        attempts = session.scalars(select(JobAttempt.error_code)
                                   .where(JobAttempt.job_id.in_(slow_ids))).all()
    outcome.other["slow_dead_with_timeout"] = sum(1 for c in codes if c == "timeout")
    outcome.other["slow_attempts"] = len(attempts)
    outcome.other["normal_succeeded"] = sum(1 for j in normal_ids if states.get(j) == "succeeded")
    return outcome


def sigterm_mid_task(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                     monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """SIGTERM a worker while it runs a task: the task is handed back and finishes on the other
    worker. The task is a long document's embed stage (~300 chunks: seconds, well past the
    soft-shutdown grace of FAST_CLOCKS), so the signal lands mid-task whatever the machine's
    speed; a small document's stages end within the grace and are never interrupted."""
    env = _configure(monkeypatch, env)
    s = stack(env, workers=2, concurrency=1, beat=True)
    files = make_corpus(tmp / "corpus", docs)
    long_doc = tmp / "long.txt"
    long_doc.write_text("\n\n".join(p.read_text() for p in make_corpus(tmp / "long", 110)))
    started = time.monotonic()
    job_ids = submit(s, [long_doc, *files])
    victim = _wait_running_worker(job_ids[:1], stage="embed")
    s.signal(victim, signal.SIGTERM)
    states = drain(job_ids, timeout=120 + docs * 2)
    outcome = tally("sigterm_mid_task", job_ids, states, started)
    with session_scope() as session:
        interrupted = session.scalars(select(JobAttempt).where(
            JobAttempt.job_id.in_(job_ids), JobAttempt.outcome.in_(("interrupted", "lost",
                                                                     "retrying")))).all()
        finished_by = {a.job_id: a.worker for a in session.scalars(select(JobAttempt).where(
            JobAttempt.job_id.in_(job_ids), JobAttempt.outcome == "succeeded"))}
    outcome.other["interrupted_attempts"] = len(interrupted)
    outcome.other["interrupted_then_succeeded"] = sum(
        1 for a in interrupted if states.get(a.job_id) == "succeeded" and a.job_id in finished_by)
    outcome.other["victim_exited"] = int(s.procs[victim].poll() is not None)
    return outcome


def duplicate_delivery(stack: StackFactory, env: dict[str, str], *, docs: int, tmp: Path,
                       monkeypatch) -> Outcome:  # type: ignore[no-untyped-def]
    """Every message delivered twice (as a visibility-timeout redelivery would): one result."""
    from tasks.names import TASK_OF_STAGE
    from workers.app import app

    env = _configure(monkeypatch, env)
    s = stack(env, workers=2, concurrency=1, beat=False)
    files = make_corpus(tmp / "corpus", docs)
    started = time.monotonic()
    job_ids = submit(s, files)
    for job_id in job_ids:  # a second parse message for every job
        app.send_task(TASK_OF_STAGE["parse"], args=[job_id])
    embed_seen: set[str] = set()
    deadline = time.monotonic() + 60 + docs * 2
    while len(embed_seen) < len(job_ids) and time.monotonic() < deadline:
        with session_scope() as session:
            rows = session.execute(select(Job.id, Job.stage).where(Job.id.in_(job_ids))).all()
        for row in rows:
            if row.stage == "embed" and row.id not in embed_seen:
                embed_seen.add(row.id)
                app.send_task(TASK_OF_STAGE["embed"], args=[row.id])  # and a second embed
        time.sleep(0.1)
    states = drain(job_ids, timeout=120 + docs * 2)
    outcome = tally("duplicate_delivery", job_ids, states, started)
    with session_scope() as session:
        outcome.other["attempts"] = len(session.scalars(
            select(JobAttempt.id).where(JobAttempt.job_id.in_(job_ids))).all())
    return outcome


def _wait_some_done(job_ids: list[str], *, fraction: float, timeout: float = 120) -> None:
    from tests.faults.harness import job_states

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(job_ids)
        if sum(1 for s in states.values() if s == "succeeded") >= max(1, fraction * len(job_ids)):
            return
        time.sleep(0.2)


def _wait_running_worker(job_ids: list[str], *, stage: str | None = None,
                         timeout: float = 60) -> str:
    """The name of a worker (`worker0`/`worker1`) running one of the jobs now (at `stage`,
    if given)."""
    deadline = time.monotonic() + timeout
    at_stage = [] if stage is None else [Job.stage == stage]
    while time.monotonic() < deadline:
        with session_scope() as session:
            worker = session.scalar(select(Job.worker).where(
                Job.id.in_(job_ids), Job.state == "running", *at_stage).limit(1))
        if worker:
            return worker.split("@", 1)[0] if "@" in worker else "worker0"
        time.sleep(0.05)
    raise AssertionError("no job started running")


SCENARIOS = [sigkill_workers, redis_wiped, postgres_restarted, always_transient,
             hard_time_limit, sigterm_mid_task, duplicate_delivery]
