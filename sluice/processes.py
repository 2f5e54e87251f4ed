"""The worker commands per queue, and a small supervisor for `sluice up`.

Each queue has its own pool, chosen for its kind of work (see DESIGN.md); pool sizes are
command-line flags, not code."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sluice import metrics
from sluice.settings import get_settings

log = logging.getLogger("sluice.up")

# queue -> celery worker arguments (pool and concurrency defaults for one machine)
WORKER_ARGS: dict[str, list[str]] = {
    "parse": ["--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "50"],
    "embed": ["--pool", "prefork", "--concurrency", "2", "--max-tasks-per-child", "1000"],
    "answer": ["--pool", "threads", "--concurrency", "4"],
    "maintenance": ["--pool", "solo"],
}


def worker_command(
    queue: str, *, extra: Sequence[str] = (), loglevel: str = "INFO", pool_args: bool = True
) -> list[str]:
    """`celery worker` for `queue` (or several, comma-separated) with the queue's pool."""
    name = queue.replace(",", "-")
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--queues", queue, "--hostname", f"{name}@%h", "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
        *(WORKER_ARGS[queue] if pool_args else []), *extra,
    ]


def beat_command(schedule_file: str, *, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.app", "beat",
            "--schedule", schedule_file, "--loglevel", loglevel]


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
            "--host", host, "--port", str(port), "--log-level", "warning"]


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the supervisor dies, so nothing is ever orphaned.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env={**env, **self.env},
                                     preexec_fn=_die_with_parent)
        log.info("started %s (pid %d)", self.name, self.proc.pid)


class Supervisor:
    """Starts children, restarts one that dies (at most 5 times a minute), and on SIGINT or
    SIGTERM stops them all: SIGTERM first (workers finish or requeue their task), then SIGKILL
    after `grace_s`."""

    def __init__(self, children: list[Child], *, env: dict[str, str], grace_s: float = 20.0):
        self.children = children
        self.env = env
        self.grace_s = grace_s
        self._stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        if metrics.MULTIPROC_ENV in self.env:  # a fresh set of processes: fresh metric files
            metrics.reset_dir(Path(self.env[metrics.MULTIPROC_ENV]))
        for child in self.children:
            child.start(self.env)
        code = 0
        while not self._stopping:
            time.sleep(0.5)
            for child in self.children:
                assert child.proc is not None
                rc = child.proc.poll()
                if rc is None or self._stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > 5:
                    log.error("%s keeps dying (exit %s); stopping everything", child.name, rc)
                    code = 1
                    self._stopping = True
                    break
                log.warning("%s exited with %s; restarting", child.name, rc)
                child.start(self.env)
        self.stop()
        return code

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        self._stopping = True

    def stop(self) -> None:
        running = [c.proc for c in self.children if c.proc and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# SIGTERM starts Celery's cold shutdown, preceded by the soft shutdown: running tasks get
# `worker_soft_shutdown_timeout` to finish, then are stopped and their messages requeued
# (a plain warm shutdown would wait for them however long they run).
# DO_NOT_TRACK: unstructured otherwise sends a telemetry event on every partition call.
WORKER_ENV = {"REMAP_SIGTERM": "SIGQUIT", "DO_NOT_TRACK": "1", "UNSTRUCTURED_DISABLE_NOTICE": "1"}
# The API's numpy query encoder runs one small matrix product per query: more BLAS threads only
# thrash on a busy machine (measured: 26 ms single-threaded vs 0.3-1.5 s with two under load).
API_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
# Each embed pool process runs the model on one thread: on 400 small documents end to end
# (2 cores), two single-threaded processes made 30.2 chunks/s where one with two threads made
# 24.5 (bench/ingest.py), as one text a call leaves a second thread little to share.
# SLUICE_EMBEDDING_THREADS set by the operator wins.
QUEUE_ENV: dict[str, dict[str, str]] = {"embed": {"SLUICE_EMBEDDING_THREADS": "1"}}


def queue_env(queue: str) -> dict[str, str]:
    """The environment a worker for `queue` (or several, comma-separated) adds, less what the
    operator has set already."""
    env: dict[str, str] = {}
    for name in queue.split(","):
        env.update(QUEUE_ENV.get(name, {}))
    return {key: value for key, value in env.items() if key not in os.environ}


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment of the API and worker processes of this machine: they share one
    metrics directory (set before prometheus_client is imported in any of them), so the API's
    /metrics includes the workers' counters."""
    env = dict(os.environ)
    env.update(WORKER_ENV)
    shared = metrics.metrics_dir(get_settings())
    shared.mkdir(parents=True, exist_ok=True)
    env[metrics.MULTIPROC_ENV] = str(shared)
    env.update(overrides)
    return env


def worker_env(queue: str, *, metrics_port: int | None = None) -> dict[str, str]:
    """What `sluice worker` adds to its environment before it becomes the Celery worker: the
    machine's shared metrics directory, or with `metrics_port` a private one that the worker
    serves itself on that port (its main process keeps this process's pid)."""
    env = {**WORKER_ENV, **queue_env(queue)}
    shared = metrics.metrics_dir(get_settings())
    if metrics_port is None:
        shared.mkdir(parents=True, exist_ok=True)
        env[metrics.MULTIPROC_ENV] = str(shared)
    else:
        env[metrics.MULTIPROC_ENV] = str(metrics.private_dir(shared, os.getpid()))
        env["SLUICE_WORKER_METRICS_PORT"] = str(metrics_port)
    return env
