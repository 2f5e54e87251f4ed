"""Worker memory over many jobs: the RSS of each worker's process tree after the first 100
small documents and after 2,000, and their ratio (a leak shows as growth).

    .venv/bin/python bench/memory.py [--docs 2000] [--first 100] [--recycle] [--broker filesystem]

SQLite in a temporary data dir and Redis as the broker (its own key prefix; the embedded
filesystem broker with `--broker filesystem`, or when Redis is not running): the real API
(uvicorn) and the parse and embed workers with their real pool commands (`sluice worker -Q
parse`: prefork 1, its child recycled every 50 tasks; `-Q embed`: prefork 1, recycled every
1,000), as `sluice up` starts them, except that both recycling limits are raised above the run
so that nothing but a leak can move the figure (the default; `--recycle` keeps the configured
limits, and the figure then depends on where in its 50-task cycle the parse child is).

Documents: --docs small text files (a SciFact title and the first three sentences of its
abstract, ~60 words, one chunk each), each made unique by a header line. The first --first are
uploaded and followed until every job is final; after a 2 s pause the RSS of each worker tree
(main process + pool children; psutil; the median of 5 samples over 2 s) is taken; then the
rest, and the same again. Embedding dominates the run (one model call per document).

Target: after / first <= 1.10 for the workers' trees together. Prints a table, then one JSON
line with every figure (also the trees' PSS, where pages shared by a parent and its forked
children count once, and the peaks sampled every 0.25 s)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    DATA,
    configure,
    log,
    machine,
    machine_line,
    print_json,
    redis_available,
    redis_prefix,
    stop_on_sigterm,
    table,
    workdir,
)

RATIO_TARGET = 1.10
WORKSPACE = "bench-memory"
MB = 1 << 20


def documents(count: int) -> list[tuple[str, bytes]]:
    import re

    with (DATA / "scifact" / "corpus.jsonl").open() as fh:
        abstracts = [r for r in map(json.loads, fh) if r["text"]]
    docs = []
    for i in range(count):
        r = abstracts[i % len(abstracts)]
        sentences = re.split(r"(?<=[.!?])\s+", r["text"])[:3]
        text = f"Memory bench document {i}.\n\n{r['title']}\n\n{' '.join(sentences)}\n"
        docs.append((f"memory-{i}.txt", text.encode()))
    return docs


def upload_all(url: str, docs: list[tuple[str, bytes]], *, threads: int = 4) -> list[str]:
    """Upload every document (a few client threads); their job ids."""
    import httpx

    job_ids: list[str | None] = [None] * len(docs)
    pending = iter(range(len(docs)))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"X-Workspace": WORKSPACE}, timeout=120) as c:
            while True:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                name, body = docs[i]
                resp = c.post("/v1/documents", files={"file": (name, body, "text/plain")})
                resp.raise_for_status()
                job_ids[i] = resp.json()["job_id"]

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [j for j in job_ids if j is not None]


def wait_final(job_ids: list[str], *, timeout: float, stack: Any) -> dict[str, int]:
    from collections import Counter

    from sqlalchemy import select

    from models import Job
    from sluice.db import read_scope
    from tests.stack import FINAL

    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        states: Counter[str] = Counter()
        with read_scope() as session:
            for start in range(0, len(job_ids), 500):
                states.update(session.scalars(select(Job.state).where(
                    Job.id.in_(job_ids[start:start + 500]))))
        pending = sum(n for s, n in states.items() if s not in FINAL)
        if pending == 0:
            return dict(states)
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not final after {timeout}s: {dict(states)}")
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        if dead:  # its memory is gone with it: the measurement cannot go on
            raise RuntimeError(f"{dead} exited: " + "; ".join(
                stack.log(n).strip().splitlines()[-1] for n in dead))
        if time.monotonic() - last > 30:
            log(f"  {pending} of {len(job_ids)} jobs not final: {dict(states)}")
            last = time.monotonic()
        time.sleep(1.0)


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS and PSS (MB) of a process tree, and its processes' count."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0, "largest_mb": 0.0}
    rss, pss, each = [], [], []
    for p in procs:
        try:
            info = p.memory_full_info()
            each.append(f"{p.pid} {'main' if p is root else 'child'} {info.rss / MB:.0f}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(info.rss / MB)
        pss.append(info.pss / MB)
    return {"rss_mb": sum(rss), "pss_mb": sum(pss), "processes": len(rss),
            "largest_mb": max(rss, default=0.0), "each": each}


def settled_memory(workers: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per worker: the median of 5 samples over 2 s, after a 2 s pause (the pool is idle)."""
    time.sleep(2)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    for _ in range(5):
        for name, pid in workers.items():
            samples[name].append(tree_memory(pid))
        time.sleep(0.4)
    out = {}
    for name, values in samples.items():
        out[name] = {key: round(statistics.median(v[key] for v in values), 1)
                     for key in ("rss_mb", "pss_mb", "largest_mb")}
        out[name]["processes"] = max(v["processes"] for v in values)
        out[name]["each"] = values[-1]["each"]
    out["total"] = {key: round(sum(out[n][key] for n in workers), 1)
                    for key in ("rss_mb", "pss_mb")}
    return out


def main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--first", type=int, default=100)
    parser.add_argument("--recycle", action="store_true",
                        help="keep the pools' configured recycling (parse child every 50 tasks, "
                             "embed every 1,000); default: off for the run, so only a leak grows")
    parser.add_argument("--broker", choices=("redis", "filesystem"), default=None,
                        help="default: Redis (own key prefix) when it runs, else the embedded "
                             "filesystem broker (see bench/README.md for why Redis is the "
                             "default)")
    parser.add_argument("--tagger-cache", type=Path, help="reuse a trained tagger from here")
    parser.add_argument("--timeout", type=float, default=3600, help="for all jobs to end (s)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from pipelines.nlp.training import ensure_tagger
    from sluice.db import dispose_engine
    from sluice.processes import worker_command
    from tests.corpus_harness import ProcessWatch
    from tests.stack import Stack

    docs = documents(args.docs)
    extra = [] if args.recycle else ["--max-tasks-per-child", str(10 * args.docs)]
    broker = args.broker or ("redis" if redis_available() else "filesystem")
    with workdir("sluice-bench-memory-", keep=args.keep) as work, \
            redis_prefix("memory") as prefix:
        tagger = ensure_tagger(DATA / "nlp" / "ud-english-ewt", args.tagger_cache or work / "nlp")
        env = {"SLUICE_DATA_DIR": str(work / "data"), "SLUICE_TAGGER_PATH": str(tagger)}
        if broker == "redis":
            env.update(SLUICE_BROKER_URL="redis://127.0.0.1:6379/0",
                       SLUICE_BROKER_KEY_PREFIX=prefix)
        configure(env)
        stack = Stack(env=env, log_dir=work / "logs", workers=0, api=True)
        for queue in ("parse", "embed"):
            stack._spawn(f"worker-{queue}", worker_command(queue, extra=extra))
        watch: ProcessWatch | None = None
        try:
            stack.start()
            pids = {n.removeprefix("worker-"): p.pid for n, p in stack.procs.items()
                    if n.startswith("worker-")}
            watch = ProcessWatch([stack])
            watch.start()
            idle = settled_memory(pids)
            log(f"idle: {idle['total']}; uploading the first {args.first} documents")
            t0 = time.monotonic()
            first_ids = upload_all(stack.url, docs[: args.first])
            first_states = wait_final(first_ids, timeout=args.timeout, stack=stack)
            first_s = time.monotonic() - t0
            after_first = settled_memory(pids)
            log(f"after {args.first}: {after_first['total']} ({first_s:.0f}s); the other "
                f"{args.docs - args.first}")
            t1 = time.monotonic()
            rest_ids = upload_all(stack.url, docs[args.first:])
            rest_states = wait_final(rest_ids, timeout=args.timeout, stack=stack)
            rest_s = time.monotonic() - t1
            after_all = settled_memory(pids)
            log(f"after {args.docs}: {after_all['total']} ({rest_s:.0f}s)")
            watch.stop()
            peaks = watch.peaks()
            replacements = watch.replacements()
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            if watch is not None and watch.is_alive():
                watch.stop()
            stack.stop()
            dispose_engine()

    states: dict[str, int] = {}
    for s in (first_states, rest_states):
        for k, v in s.items():
            states[k] = states.get(k, 0) + v
    figures: dict[str, Any] = {}
    for name in ("parse", "embed", "total"):
        a, b = after_first[name], after_all[name]
        figures[name] = {
            "idle_rss_mb": idle[name]["rss_mb"],
            "first_rss_mb": a["rss_mb"], "after_rss_mb": b["rss_mb"],
            "rss_ratio": round(b["rss_mb"] / a["rss_mb"], 3),
            "first_pss_mb": a["pss_mb"], "after_pss_mb": b["pss_mb"],
            "pss_ratio": round(b["pss_mb"] / a["pss_mb"], 3),
        }
        if name != "total":
            figures[name]["processes"] = [a["processes"], b["processes"]]
            figures[name]["pid_cmd_rss_mb"] = {"first": a["each"], "after": b["each"]}
            figures[name]["pool_children_replaced"] = replacements.get(f"worker-{name}", 0)
    ok = figures["total"]["rss_ratio"] <= RATIO_TARGET

    print()
    recycling = ("as configured (parse child every 50 tasks, embed every 1,000)" if args.recycle
                 else "off (--max-tasks-per-child above the run)")
    print(f"Worker memory: {args.docs} small text documents (~60 words, one chunk each) through "
          f"the parse and embed workers; SQLite, {broker} broker; pool recycling {recycling}")
    headers = ("worker tree", "idle RSS MB", f"after {args.first} MB", f"after {args.docs} MB",
               "ratio", f"PSS after {args.first}", f"PSS after {args.docs}", "PSS ratio",
               "children replaced")
    rows = []
    for name in ("parse", "embed", "total"):
        f = figures[name]
        rows.append((name, f["idle_rss_mb"], f["first_rss_mb"], f["after_rss_mb"],
                     f["rss_ratio"], f["first_pss_mb"], f["after_pss_mb"], f["pss_ratio"],
                     f.get("pool_children_replaced")))
    print(table(headers, rows))
    print(f"target: total RSS ratio <= {RATIO_TARGET}: {'met' if ok else 'MISSED'}; jobs: "
          f"{states}; first {args.first} in {first_s:.0f}s, the other "
          f"{args.docs - args.first} in {rest_s:.0f}s "
          f"({(args.docs - args.first) / rest_s:.1f} documents/s); peaks during the run "
          f"(0.25 s samples): workers {peaks['worker']:.0f} MB, largest child "
          f"{peaks['worker_max_child']:.0f} MB, API {peaks['api']:.0f} MB")
    print(machine_line())
    print_json({"workers": figures, "ratio_target": RATIO_TARGET, "ratio_ok": ok,
                "docs": args.docs, "first": args.first, "recycle": args.recycle, "broker": broker,
                "jobs": states, "first_s": round(first_s, 1), "rest_s": round(rest_s, 1),
                "peak_mb": {k: round(v) for k, v in peaks.items() if v},
                **machine()})
    return 0 if states.get("succeeded", 0) == args.docs else 1


if __name__ == "__main__":
    sys.exit(main())
