"""The real stack as subprocesses: the API under uvicorn and Celery worker processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from sluice.processes import API_ENV, api_command, beat_command, child_env, worker_command

REPO = Path(__file__).resolve().parents[1]
ALL_QUEUES = "parse,embed,answer,maintenance"
FINAL = {"succeeded", "failed", "dead", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(
        self,
        *,
        env: dict[str, str],
        log_dir: Path,
        workers: int = 1,
        queues: str = ALL_QUEUES,
        concurrency: int = 2,
        api: bool = True,
        beat: bool = False,
        worker_args: Sequence[str] = (),
    ) -> None:
        self.env = {**child_env(env), "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.workers = workers
        self.queues = queues
        self.concurrency = concurrency
        self.with_api = api
        self.with_beat = beat
        self.worker_args = list(worker_args)  # more `celery worker` flags for every worker
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, workspace: str = "default") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Workspace": workspace}, timeout=60)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(argv, env={**self.env, **(env or {})}, cwd=REPO,
                                            stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> None:
        if self.with_api:
            self._spawn("api", api_command("127.0.0.1", self.port), API_ENV)
        for i in range(self.workers):
            self.start_worker(f"worker{i}")
        if self.with_beat:
            self._spawn("beat", beat_command(str(self.log_dir / "beat-schedule")))
        self.wait_ready()

    def worker_names(self) -> list[str]:
        return [n for n in self.procs if n.startswith("worker")]

    def start_worker(self, name: str, *, hostname: str | None = None) -> None:
        """Start worker process `name`; `hostname` (default `name@<this host>`) is the node
        name it reports, as a worker on another machine would."""
        argv = worker_command(self.queues, pool_args=False, extra=[
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "--hostname", hostname or f"{name}@%h", *self.worker_args])
        self._spawn(name, argv)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.procs)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
                if name == "api":
                    try:
                        if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                            pending.discard(name)
                    except httpx.HTTPError:
                        pass
                elif name == "beat" or " ready." in self.log(name):
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise RuntimeError(f"not ready after {timeout}s: {pending}\n"
                               + "\n".join(self.log(n)[-3000:] for n in pending))

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"==== {n}\n{self.log(n)[-6000:]}" for n in self.procs)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # Helpers for tests ------------------------------------------------------------------------
    def upload(self, path: Path, *, workspace: str = "default", **params: Any) -> httpx.Response:
        with self.client(workspace) as client, path.open("rb") as fh:
            return client.post("/v1/documents", files={"file": (path.name, fh)}, params=params)

    def wait_jobs(self, job_ids: list[str], *, workspace: str = "default",
                  timeout: float = 300) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        states: dict[str, dict[str, Any]] = {}
        with self.client(workspace) as client:
            while time.monotonic() < deadline:
                for job_id in job_ids:
                    if states.get(job_id, {}).get("state") not in FINAL:
                        states[job_id] = client.get(f"/v1/jobs/{job_id}").json()
                if all(s.get("state") in FINAL for s in states.values()):
                    return states
                time.sleep(0.3)
        raise AssertionError(f"jobs not finished after {timeout}s: {states}\n{self.logs()}")


StackFactory = Callable[..., Stack]
