"""Upload latency: many concurrent clients posting small files to the real API, against a
trivial FastAPI endpoint that takes the same multipart body and returns 202, in the same run.

    .venv/bin/python bench/upload.py [--files 2000] [--clients 64] [--setups embedded,production]

Per setup (embedded: SQLite + filesystem broker; production: a throwaway PostgreSQL + Redis
under its own key prefix), four runs of --files uploads by --clients concurrent keep-alive
connections (a small raw HTTP/1.1 client on asyncio, so the client is never the bottleneck):

1. limit, idle: `upload:limit_app` under uvicorn (same flags and environment as the API): reads
   the whole request body, answers 202 with a small JSON body. Nothing else runs.
2. Sluice, idle: `POST /v1/documents` on the real API (uvicorn), no worker running: every
   upload streams to the blob store, records Document + Job and publishes the parse message.
   Each 202 must come back while its job is still `queued` (no worker exists: the API cannot
   have waited on parsing), which the ledger confirms afterwards.
3. limit, workers busy, and 4. Sluice, workers busy: the parse and embed workers (their real
   pool commands) are started on run 2's backlog, and both runs repeat with new files while
   the workers parse and embed. The API never waits on a worker, so Sluice's ratio to the limit
   should stay as it was; what is left of the difference is CPU the workers take from the API
   on a small machine (their CPU time during the run is printed).

Files: SciFact abstracts, one per file, each made unique by a header line (~1-2 KB, .txt).
Target: Sluice p99 under 100 ms. Prints a table, then one JSON line with every figure."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

WORKSPACE = "bench-upload"
BOUNDARY = "sluice-bench-boundary-7d1f"
P99_TARGET_MS = 100.0

# The limit: the least an HTTP server in this stack can do with the same request.
limit_app = FastAPI()


@limit_app.post("/v1/documents", status_code=202)
async def accept_upload(request: Request) -> dict[str, Any]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return {"document_id": "-", "job_id": "-", "duplicate": False, "bytes": size}


# The client ------------------------------------------------------------------------------------
def multipart_request(port: int, name: str, data: bytes, workspace: str = WORKSPACE) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n").encode() + data + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"X-Workspace: {workspace}\r\nUser-Agent: sluice-bench\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _load(port: int, requests: list[bytes], clients: int
                ) -> list[tuple[float, float, int, bytes]]:
    """Send every request over `clients` keep-alive connections; (sent, answered, status,
    body) per request, in request order."""
    results: list[Any] = [None] * len(requests)
    pending = iter(range(len(requests)))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in pending:
                t0 = time.perf_counter()
                writer.write(requests[i])
                await writer.drain()
                status, body = await _read_response(reader)
                results[i] = (t0, time.perf_counter(), status, body)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def run_load(port: int, requests: list[bytes], clients: int) -> dict[str, Any]:
    from _common import pct

    started = time.perf_counter()
    results = asyncio.run(_load(port, requests, clients))
    wall = time.perf_counter() - started
    latencies = [(done - sent) * 1000 for sent, done, _, _ in results]
    statuses: dict[int, int] = {}
    for _, _, status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    tenth = max(1, len(latencies) // 10)
    return {
        "requests": len(requests), "rps": round(len(requests) / wall, 1),
        # in sending order: a latency that grows with what the workspace holds shows here
        "p50_first_tenth_ms": round(pct(latencies[:tenth], 50), 2),
        "p50_last_tenth_ms": round(pct(latencies[-tenth:], 50), 2),
        "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
        "max_ms": round(max(latencies), 2), "statuses": statuses, "wall_s": round(wall, 2),
        "bodies": [body for _, _, _, body in results],
    }


# The bench -------------------------------------------------------------------------------------
def make_files(count: int, offset: int) -> list[tuple[str, bytes]]:
    from _common import DATA

    with (DATA / "scifact" / "corpus.jsonl").open() as fh:
        abstracts = [r for r in map(json.loads, fh) if r["text"]]
    files = []
    for i in range(offset, offset + count):
        r = abstracts[i % len(abstracts)]
        text = f"Upload {i} of the Sluice upload bench.\n\n{r['title']}\n\n{r['text']}\n"
        files.append((f"upload-{i}.txt", text.encode()))
    return files


def run_setup(setup: str, *, env: dict[str, str], work: Path, files: int, clients: int,
              workspaces: int = 1) -> dict[str, Any]:
    import psutil
    from _common import configure, log, ratio
    from sqlalchemy import func, select

    from models import Job
    from sluice.db import dispose_engine, read_scope
    from sluice.processes import API_ENV, worker_command
    from tests.stack import Stack, free_port

    configure(env)
    bench_dir = str(Path(__file__).resolve().parent)

    def requests_for(port: int, batch: list[tuple[str, bytes]]) -> list[bytes]:
        names = [WORKSPACE if workspaces == 1 else f"{WORKSPACE}-{i % workspaces}"
                 for i in range(len(batch))]
        return [multipart_request(port, n, d, w) for (n, d), w in zip(batch, names, strict=True)]

    limit_port = free_port()
    stack = Stack(env=env, log_dir=work / "logs", workers=0, api=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with (work / "logs" / "limit.log").open("ab") as limit_log:
        limit = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "upload:limit_app", "--app-dir", bench_dir,
             "--host", "127.0.0.1", "--port", str(limit_port), "--log-level", "warning"],
            env={**stack.env, **API_ENV}, stdout=limit_log, stderr=subprocess.STDOUT)
    runs: dict[str, dict[str, Any]] = {}
    try:
        stack.start()
        _wait_http(limit_port)
        idle_files = make_files(files, 0)
        busy_files = make_files(files, files)
        # A few requests first, so neither server is measured cold.
        warm = make_files(20, 10 * files)
        run_load(limit_port, requests_for(limit_port, warm), 4)
        run_load(stack.port, requests_for(stack.port, warm), 4)

        log(f"{setup}: limit, idle")
        runs["limit_idle"] = run_load(limit_port, requests_for(limit_port, idle_files), clients)
        log(f"{setup}: sluice, idle (no worker)")
        runs["sluice_idle"] = run_load(stack.port, requests_for(stack.port, idle_files), clients)
        job_ids = [json.loads(b)["job_id"] for b in runs["sluice_idle"]["bodies"]]
        with read_scope() as session:
            states = dict(session.execute(
                select(Job.state, func.count()).where(Job.id.in_(job_ids))
                .group_by(Job.state)).all())
            started = session.scalar(select(func.count()).select_from(Job).where(
                Job.id.in_(job_ids), Job.started_at.is_not(None)))
        runs["sluice_idle"]["jobs_by_state_after"] = states
        runs["sluice_idle"]["jobs_started_before_workers"] = started

        log(f"{setup}: starting the parse and embed workers on the backlog")
        for queue in ("parse", "embed"):
            stack._spawn(f"worker-{queue}", worker_command(queue))
        stack.wait_ready()
        _wait_busy(job_ids)
        workers = [psutil.Process(p.pid) for n, p in stack.procs.items() if n.startswith("worker")]
        for name, port in (("limit_busy", limit_port), ("sluice_busy", stack.port)):
            log(f"{setup}: {name.replace('_', ', workers ')}")
            cpu0, t0 = _tree_cpu(workers), time.perf_counter()
            runs[name] = run_load(port, requests_for(port, busy_files), clients)
            runs[name]["worker_cpu_share"] = round(
                (_tree_cpu(workers) - cpu0) / (time.perf_counter() - t0), 2)
        with read_scope() as session:
            runs["sluice_busy"]["backlog_done_during_run"] = session.scalar(
                select(func.count()).select_from(Job).where(
                    Job.id.in_(job_ids), Job.started_at.is_not(None)))
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        limit.terminate()
        limit.wait(timeout=20)
        dispose_engine()

    for r in runs.values():
        r.pop("bodies", None)
    out: dict[str, Any] = {"setup": setup, **runs}
    for cond in ("idle", "busy"):
        s, lim = runs[f"sluice_{cond}"], runs[f"limit_{cond}"]
        out[f"{cond}_rps_ratio"] = ratio(s["rps"], lim["rps"])
        out[f"{cond}_p99_ratio"] = ratio(s["p99_ms"], lim["p99_ms"])
        out[f"{cond}_p99_ok"] = s["p99_ms"] < P99_TARGET_MS
    ok_statuses = all(set(runs[k]["statuses"]) == {202} for k in runs)
    out["all_202"] = ok_statuses
    out["never_waited_on_parsing"] = (
        runs["sluice_idle"]["jobs_started_before_workers"] == 0
        and set(runs["sluice_idle"]["jobs_by_state_after"]) == {"queued"})
    return out


def _wait_http(port: int, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answers on port {port}")


def _wait_busy(job_ids: list[str], timeout: float = 120) -> None:
    """Until the workers have finished parsing a few documents: they are up and working."""
    from sqlalchemy import func, select

    from models import Job
    from sluice.db import read_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with read_scope() as session:
            moved = session.scalar(select(func.count()).select_from(Job).where(
                Job.id.in_(job_ids), Job.stage == "embed"))
        if moved and moved >= 5:
            return
        time.sleep(0.5)
    raise RuntimeError("the workers did not start on the backlog")


def _tree_cpu(procs: list[Any]) -> float:
    """CPU seconds (user + system) of these processes and all their children, alive now."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def main() -> int:
    from _common import stop_on_sigterm

    stop_on_sigterm()
    import argparse

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
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=2000, help="uploads per run")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--setups", default="embedded,production",
                        help="embedded (SQLite + filesystem broker), production (PostgreSQL + "
                             "Redis)")
    parser.add_argument("--workspaces", type=int, default=1,
                        help="spread the uploads over this many workspaces (default one)")
    parser.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    args = parser.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    if "production" in setups and not redis_available():
        log("Redis is not running on 127.0.0.1:6379: the production setup is skipped")
        setups.remove("production")

    results = []
    with workdir("sluice-bench-upload-", keep=args.keep) as work:
        for setup in setups:
            env = {"SLUICE_DATA_DIR": str(work / setup / "data")}
            with redis_prefix("upload") as prefix:
                pg = Postgres() if setup == "production" else None
                try:
                    if pg is not None:
                        env.update(SLUICE_DATABASE_URL=pg.database(),
                                   SLUICE_BROKER_URL="redis://127.0.0.1:6379/0",
                                   SLUICE_BROKER_KEY_PREFIX=prefix)
                    results.append(run_setup(setup, env=env, work=work / setup,
                                             files=args.files, clients=args.clients,
                                             workspaces=args.workspaces))
                finally:
                    if pg is not None:
                        pg.close()

    print()
    print(f"Uploads: {args.files} small text files per run (~1-2 KB), {args.clients} concurrent "
          f"keep-alive clients, POST /v1/documents to 202, "
          f"{'one workspace' if args.workspaces == 1 else f'{args.workspaces} workspaces'}")
    headers = ("setup", "run", "workers", "req/s", "ratio", "p50 ms", "p99 ms", "ratio",
               "max ms", "worker CPU", "p99 < 100 ms")
    rows = []
    for r in results:
        for cond in ("idle", "busy"):
            for server in ("limit", "sluice"):
                f = r[f"{server}_{cond}"]
                sl = server == "sluice"
                rows.append((
                    r["setup"], server, "busy" if cond == "busy" else "none", f["rps"],
                    r[f"{cond}_rps_ratio"] if sl else None, f["p50_ms"], f["p99_ms"],
                    r[f"{cond}_p99_ratio"] if sl else None, f["max_ms"],
                    f"{f['worker_cpu_share']:.2f} cores" if "worker_cpu_share" in f else None,
                    ("yes" if r[f"{cond}_p99_ok"] else "NO") if sl else None))
    print(table(headers, rows))
    print("limit = upload:limit_app under uvicorn: reads the same body, answers 202; ratio = "
          "Sluice / limit in the same condition (req/s: higher is better, p99: lower is better)")
    for r in results:
        idle = r["sluice_idle"]
        print(f"{r['setup']}: every 202 of the idle run came back with no worker running; "
              f"afterwards its {idle['requests']} jobs were {idle['jobs_by_state_after']} and "
              f"{idle['jobs_started_before_workers']} had started; during the busy run the "
              f"workers moved {r['sluice_busy']['backlog_done_during_run']} of them on; "
              f"all responses 202: {r['all_202']}")
        print(f"{r['setup']}: Sluice p50, first tenth -> last tenth of each run (the workspace "
              f"fills): idle {idle['p50_first_tenth_ms']:.0f} -> {idle['p50_last_tenth_ms']:.0f} "
              f"ms, busy {r['sluice_busy']['p50_first_tenth_ms']:.0f} -> "
              f"{r['sluice_busy']['p50_last_tenth_ms']:.0f} ms")
    print(machine_line())
    print_json({"setups": results, "files": args.files, "clients": args.clients,
                "workspaces": args.workspaces,
                "p99_target_ms": P99_TARGET_MS, **machine()})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
