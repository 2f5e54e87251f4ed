"""The job system's own overhead: no-op jobs through Sluice's full job path against bare Celery
no-op tasks on the same broker, the same Celery configuration and the same worker process.

    .venv/bin/python bench/overhead.py [--setups redis-postgres,redis-sqlite,embedded]
                                       [--jobs 2000] [--latency-jobs 300] [--rate 20]

A Sluice no-op job is what a real job is, minus the work: the producer (this process) creates
its `Job` row through the ledger (`ledger.insert_jobs`, with its first event, marked
published) and commits, then `tasks.publish.publish` sends it, as the API does for a question;
the worker runs it through `tasks.runner.run_stage` (claim by compare-and-set, attempt row,
event, heartbeat thread) with a work function that only records success through the ledger
(`ctx.succeed`, as the answer stage ends; on PostgreSQL the claim and the success are one
statement each, see `models.ledger.claim_at_once`).
To run that unchanged code, this module registers a stage `noop` in `tasks.names`' tables
(task `sluice.bench.noop` on queue `answer`), in this process and in the worker, which imports
this file as its Celery app module (`celery -A overhead`, the project's `workers.app.app` with
the two bench tasks added). The bare task (`sluice.bench.bare_noop`, sent by
`app.send_task(name, args=[n])`) only appends its start and end times to a file.

Per setup, with one worker on queue `answer`, run as `sluice up` runs that queue's worker
(threads, 4; --pool prefork --concurrency 2 for a process pool):

- throughput: --jobs no-ops enqueued by one producer as fast as it can while the worker runs;
  jobs/s = jobs / (last end - first enqueue); enqueue/s = jobs / time spent enqueueing;
- latency at low load: first, after the warm-up and a pause of SETTLE_S, before any burst
  (the bursts leave the database seconds of background work: a vacuum, a checkpoint),
  --latency-jobs no-ops of each path at --rate a second, in blocks of LATENCY_BLOCK, bare and
  Sluice alternating; enqueue-to-start = from just before the producer creates the job (bare:
  sends the task) to the start of the task body (Sluice: the job's `started_at` in the
  ledger, written by the claim), p50 / p99.

Targets: Sluice >= 0.5 of bare Celery's jobs/s; p99 enqueue-to-start < 50 ms at low load on
Redis (the filesystem broker polls every SLUICE_BROKER_POLLING_INTERVAL_S, 0.02 s).
Prints a table, then one JSON line with every figure."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from celery import Task  # noqa: E402

from models import JobKind, ledger  # noqa: E402
from tasks import names  # noqa: E402
from tasks.runner import Handoff, StageContext, run_stage  # noqa: E402
from workers.app import app  # noqa: E402

NOOP_STAGE = "noop"
NOOP_TASK = "sluice.bench.noop"
BARE_TASK = "sluice.bench.bare_noop"
QUEUE = names.QUEUE_ANSWER
OUT_ENV = "BENCH_OVERHEAD_DIR"
SETTLE_S = 3.0
LATENCY_BLOCK = 50
WORKSPACE = "bench-overhead"

# The no-op stage in the project's own tables, so `publish` and `run_stage` run unchanged
# (celeryconfig.build reads QUEUE_OF_TASK for its routes when workers.app.reconfigure runs).
names.TASK_OF_STAGE[NOOP_STAGE] = NOOP_TASK
names.STAGE_OF_TASK[NOOP_TASK] = NOOP_STAGE
names.QUEUE_OF_TASK[NOOP_TASK] = QUEUE
names.QUEUE_OF_TASK[BARE_TASK] = QUEUE


@app.task(name=NOOP_TASK, bind=True)
def sluice_noop(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=NOOP_STAGE, worker=self.request.hostname,
                     work=_no_work)


def _no_work(ctx: StageContext) -> Handoff:
    return ctx.succeed(None)


_record_file: Any = None
_record_lock = threading.Lock()  # a threads pool's tasks share the file


@app.task(name=BARE_TASK)
def bare_noop(seq: int) -> None:
    global _record_file
    started = time.time()
    with _record_lock:
        if _record_file is None:
            _record_file = open(Path(os.environ[OUT_ENV]) / f"bare-{os.getpid()}.log",  # noqa: SIM115
                                "a", buffering=1)
        _record_file.write(f"{seq} {started!r} {time.time()!r}\n")


# The bench (this process) ---------------------------------------------------------------------
def main() -> int:  # noqa: PLR0915
    from _common import stop_on_sigterm

    stop_on_sigterm()
    import argparse
    import uuid

    from _common import (
        Postgres,
        log,
        machine,
        machine_line,
        print_json,
        redis_available,
        redis_prefix,
        table,
        workdir,
        worker_flag,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--setups", default="redis-postgres,redis-sqlite,embedded",
                        help="broker-database pairs: redis-postgres, redis-sqlite, embedded "
                             "(filesystem broker + SQLite)")
    parser.add_argument("--jobs", type=int, default=1000,
                        help="no-ops per throughput measurement (jobs/s, then drain/s), per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, bare and Sluice alternating; rates are the rounds' median")
    parser.add_argument("--latency-jobs", type=int, default=300,
                        help="no-ops at --rate, spread over the rounds")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs/s of the latency phase")
    parser.add_argument("--warmup", type=int, default=50)
    pool, concurrency = worker_flag(QUEUE, "--pool"), worker_flag(QUEUE, "--concurrency")
    parser.add_argument("--pool", choices=("prefork", "threads"), default=pool,
                        help=f"the worker's pool (default {pool}, as sluice up runs the queue)")
    parser.add_argument("--concurrency", type=int, default=int(concurrency or 2))
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for this process and the worker, e.g. "
                             "SLUICE_BROKER_POLLING_INTERVAL_S=0.1")
    parser.add_argument("--keep", action="store_true", help="keep data dirs and worker logs")
    args = parser.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    if any(s.startswith("redis") for s in setups) and not redis_available():
        log("Redis is not running on 127.0.0.1:6379: the redis setups are skipped")
        setups = [s for s in setups if not s.startswith("redis")]

    results: list[dict[str, Any]] = []
    pg: Postgres | None = None
    with workdir("sluice-bench-overhead-", keep=args.keep) as work:
        try:
            for setup in setups:
                with redis_prefix("overhead") as prefix:
                    env = {"SLUICE_DATA_DIR": str(work / setup / "data"),
                           **dict(item.split("=", 1) for item in args.env)}
                    if setup.startswith("redis"):
                        env.update(SLUICE_BROKER_URL="redis://127.0.0.1:6379/0",
                                   SLUICE_BROKER_KEY_PREFIX=prefix)
                    if setup.endswith("postgres"):
                        pg = pg or Postgres()
                        env["SLUICE_DATABASE_URL"] = pg.database()
                    log(f"{setup}: starting the worker")
                    results.append(run_setup(setup, env=env, work=work / setup, args=args,
                                             run_id=uuid.uuid4().hex[:6]))
        finally:
            if pg is not None:
                pg.close()

    print()
    print(f"No-op jobs: Sluice's job path vs bare Celery, one worker ({args.pool} "
          f"{args.concurrency}), queue {QUEUE}; {args.rounds} rounds, bare and Sluice "
          f"alternating, each with {args.jobs} jobs enqueued by one producer as fast as it can, "
          f"then {args.jobs} drained from a backlog (rates: median of the rounds); latency over "
          f"{args.latency_jobs} jobs at {args.rate:g}/s")
    headers = ("setup", "path", "jobs/s", "ratio", "enqueue/s", "ratio", "drain/s", "ratio",
               "start p50 ms", "start p99 ms", "burst start p50 ms", "target")
    rows = []
    for r in results:
        for path in ("bare", "sluice"):
            f = r[path]
            sl = path == "sluice"
            rows.append((r["setup"], path, f["jobs_per_s"], r["throughput_ratio"] if sl else None,
                         f["enqueue_per_s"], r["enqueue_ratio"] if sl else None,
                         f["drain_per_s"], r["drain_ratio"] if sl else None,
                         f["start_p50_ms"], f["start_p99_ms"], f["burst_start_p50_ms"],
                         r["verdict"] if sl else None))
    print(table(headers, rows))
    print("jobs/s = jobs / (last end - first enqueue), producer and worker running together; "
          "enqueue/s = the producer alone (one thread); drain/s = the worker alone, emptying a "
          "backlog of as many jobs; start = enqueue-to-start at low load (Sluice: the ledger's "
          "started_at); burst start = the same during the jobs/s run; ratio = Sluice / bare, "
          "the median of the rounds' ratios. "
          "Targets: jobs/s ratio >= 0.5; on Redis, Sluice's start p99 < 50 ms")
    print(machine_line())
    print_json({"setups": results, "jobs": args.jobs, "rounds": args.rounds,
                "latency_jobs": args.latency_jobs,
                "settings": dict(item.split("=", 1) for item in args.env),
                "rate": args.rate, "pool": args.pool, "concurrency": args.concurrency, **machine()})
    return 0


def run_setup(setup: str, *, env: dict[str, str], work: Path, args: Any,
              run_id: str) -> dict[str, Any]:
    from _common import REPO, configure, log, ratio

    from models import Workspace
    from sluice.db import dispose_engine, session_scope
    from sluice.processes import worker_command
    from tests.stack import Stack

    out = work / "bare"
    out.mkdir(parents=True)
    configure(env)
    with session_scope() as session:
        session.add(Workspace(id=WORKSPACE))
    argv = worker_command(QUEUE, pool_args=False, extra=[
        "--pool", args.pool, "--concurrency", str(args.concurrency)])
    argv[argv.index("workers.app")] = "overhead"
    hostname = f"bench-overhead-{run_id}@{socket.gethostname()}"
    argv[argv.index("--hostname") + 1] = hostname
    stack = Stack(env=env, log_dir=work / "logs", workers=0, api=False)
    bench_dir = str(Path(__file__).resolve().parent)
    stack._spawn("worker", argv, {OUT_ENV: str(out), "PYTHONPATH": f"{bench_dir}:{REPO}"})
    stack.wait_ready()
    seq = 0
    try:
        def bare(n: int, *, rate: float | None) -> list[tuple[int, float]]:
            nonlocal seq
            sent = []
            for _ in range(n):
                seq += 1
                sent.append((seq, time.time()))
                app.send_task(BARE_TASK, args=[seq])
                _pace(rate, len(sent), sent[0][1])
            return sent

        def sluice(n: int, *, rate: float | None) -> list[tuple[str, float]]:
            sent = []
            for _ in range(n):
                t0 = time.time()
                job = ledger.NewJob(workspace_id=WORKSPACE, kind=JobKind.ANSWER,
                                    stage=NOOP_STAGE,  # type: ignore[arg-type]
                                    request_id=None, published=True)
                with session_scope() as session:
                    ledger.insert_jobs(session, [job])
                job_id = job.id
                _publish(job_id)
                sent.append((job_id, t0))
                _pace(rate, len(sent), sent[0][1])
            return sent

        paths = {"bare": (bare, lambda sent: _wait_bare(out, sent)),
                 "sluice": (sluice, _wait_sluice)}
        for enqueue, wait in paths.values():
            wait(enqueue(args.warmup, rate=None))
        log(f"{setup}: latency at {args.rate:g}/s")
        time.sleep(SETTLE_S)
        slow: dict[str, Timings] = {"bare": [], "sluice": []}
        for block, first in enumerate(range(0, args.latency_jobs, LATENCY_BLOCK)):
            for path in (("bare", "sluice") if block % 2 == 0 else ("sluice", "bare")):
                enqueue, wait = paths[path]
                n = min(LATENCY_BLOCK, args.latency_jobs - first)
                slow[path] += wait(enqueue(n, rate=args.rate))
        # Rounds, bare and Sluice alternating (each round starts with the other one): a load
        # that comes and goes on the machine falls on both alike.
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            this: dict[str, dict[str, Any]] = {}
            for path in (("bare", "sluice") if r % 2 == 0 else ("sluice", "bare")):
                enqueue, wait = paths[path]
                log(f"{setup}: round {r + 1}/{args.rounds}: {path}")
                burst = wait(enqueue(args.jobs, rate=None))
                _consume(hostname, on=False)  # a backlog, then the worker drains it
                backlog = enqueue(args.jobs, rate=None)
                _consume(hostname, on=True)
                drained = wait(backlog)
                this[path] = _rates(burst, drained)
            rounds.append(this)
            log(f"{setup}: round {r + 1}: {this}")
        figures: dict[str, Any] = {"setup": setup}
        for path in ("bare", "sluice"):
            figures[path] = {
                key: round(statistics.median(rnd[path][key] for rnd in rounds), 1)
                for key in ("jobs_per_s", "enqueue_per_s", "drain_per_s", "burst_start_p50_ms",
                            "burst_start_p99_ms")}
            figures[path].update(_latency(slow[path]))
            figures[path]["rounds"] = [rnd[path] for rnd in rounds]
        # Each ratio is the median of the rounds' ratios (Sluice and bare of the same round).
        for name, key in (("throughput_ratio", "jobs_per_s"), ("drain_ratio", "drain_per_s"),
                          ("enqueue_ratio", "enqueue_per_s")):
            figures[name] = round(statistics.median(
                rnd["sluice"][key] / rnd["bare"][key] for rnd in rounds), 3)
        figures["latency_p99_ratio"] = ratio(figures["sluice"]["start_p99_ms"],
                                             figures["bare"]["start_p99_ms"])
        figures["throughput_ok"] = (figures["throughput_ratio"] or 0) >= 0.5
        if setup.startswith("redis"):
            figures["latency_ok"] = figures["sluice"]["start_p99_ms"] < 50
        misses = [name for name, key in (("throughput", "throughput_ok"),
                                         ("p99", "latency_ok")) if figures.get(key) is False]
        figures["verdict"] = "missed: " + ", ".join(misses) if misses else "met"
        return figures
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        dispose_engine()


def _publish(job_id: str) -> None:
    """As the API publishes a job it has just created: marked published with its creation,
    its request id (none here) in the log context."""
    from sluice.logs import bind_context
    from tasks.publish import publish

    bind_context(job_id=job_id)
    if not publish(job_id, NOOP_STAGE, mark=False):
        raise RuntimeError(f"publish of {job_id} failed")


def _consume(hostname: str, *, on: bool) -> None:
    """Make the worker start or stop consuming the queue (Celery remote control)."""
    control = app.control.add_consumer if on else app.control.cancel_consumer
    replies = control(QUEUE, destination=[hostname], reply=True, timeout=10)
    if not replies:
        raise RuntimeError(f"worker {hostname} did not answer {control.__name__}")


def _pace(rate: float | None, sent: int, first: float) -> None:
    if rate:
        delay = first + sent / rate - time.time()
        if delay > 0:
            time.sleep(delay)


# One timed batch: (enqueued at, started at, ended at) per job, wall-clock seconds.
Timings = list[tuple[float, float, float]]


def _wait_bare(out: Path, sent: list[tuple[int, float]], timeout: float = 600) -> Timings:
    wanted = dict(sent)
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[int, tuple[float, float]] = {}
        for path in out.glob("bare-*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and int(parts[0]) in wanted:
                    seen[int(parts[0])] = (float(parts[1]), float(parts[2]))
        if len(seen) == len(wanted):
            return [(wanted[s], *seen[s]) for s in wanted]
        if time.monotonic() > deadline:
            raise RuntimeError(f"bare: {len(wanted) - len(seen)} tasks never ran")
        time.sleep(0.2)


def _wait_sluice(sent: list[tuple[str, float]], timeout: float = 600) -> Timings:
    from sqlalchemy import select

    from models import Job
    from sluice.db import read_scope

    wanted = dict(sent)
    ids = list(wanted)
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        with read_scope() as session:
            for start in range(0, len(ids), 500):
                rows += session.execute(
                    select(Job.id, Job.state, Job.started_at, Job.finished_at)
                    .where(Job.id.in_(ids[start:start + 500]))).all()
        done = [r for r in rows if r.state == "succeeded"]
        if len(done) == len(ids):
            return [(wanted[r.id], _epoch(r.started_at), _epoch(r.finished_at)) for r in done]
        stuck = [r for r in rows if r.state not in ("queued", "running", "succeeded")]
        if stuck or time.monotonic() > deadline:
            raise RuntimeError(f"sluice: {len(ids) - len(done)} jobs not succeeded: "
                               f"{[(r.id, r.state) for r in rows if r.state != 'succeeded'][:5]}")
        time.sleep(0.2)


def _epoch(value: Any) -> float:
    from datetime import UTC

    return float((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


def _rates(burst: Timings, drained: Timings) -> dict[str, float]:
    from _common import pct

    first_enqueue = min(t[0] for t in burst)
    last_enqueue = max(t[0] for t in burst)
    last_end = max(t[2] for t in burst)
    burst_ms = [(s - e) * 1000 for e, s, _ in burst]
    drain_s = max(t[2] for t in drained) - min(t[1] for t in drained)
    return {
        "jobs_per_s": round(len(burst) / (last_end - first_enqueue), 1),
        # the last job's enqueue has not ended yet at last_enqueue: n - 1 intervals
        "enqueue_per_s": round((len(burst) - 1) / max(last_enqueue - first_enqueue, 1e-9), 1),
        "drain_per_s": round(len(drained) / drain_s, 1),
        "burst_start_p50_ms": round(pct(burst_ms, 50), 1),
        "burst_start_p99_ms": round(pct(burst_ms, 99), 1),
    }


def _latency(slow: Timings) -> dict[str, float]:
    from _common import pct

    start_ms = [(s - e) * 1000 for e, s, _ in slow]
    return {
        "start_p50_ms": round(pct(start_ms, 50), 2),
        "start_p99_ms": round(pct(start_ms, 99), 2),
        "start_max_ms": round(max(start_ms), 2),
        "run_p50_ms": round(pct([(f - s) * 1000 for _, s, f in slow], 50), 2),
    }


if __name__ == "__main__":
    sys.exit(main())
