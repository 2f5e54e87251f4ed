"""Fairness between workspaces: one workspace's single upload while another floods thousands.

    .venv/bin/python bench/fairness.py [--docs 2000] [--samples 3] [--cap N|none]

The embedded default (SQLite + filesystem broker) in a temporary data dir: the real API
(uvicorn), the worker processes of the corpus bench (`tests/corpus_harness.py`: parse prefork 2,
embed prefork 1, answer+maintenance prefork 1) and beat. Documents: SciFact abstracts
(`../shared/data/scifact/corpus.jsonl`, those of 40 words or more) written as .txt files, one
chunk or two each.

1. Idle: after warm-up documents that reach every parse and embed pool process (each loads
   its parser and model on first use), workspace B uploads one document and waits for its job
   to be `succeeded` (client-side: from the POST to the GET that shows it), --samples times,
   one after the other.
2. Flood: workspace A uploads --docs documents (4 client threads); as soon as they are all
   accepted, B uploads one document and waits for it the same way, --samples times.
3. The stack is torn down: A's documents need not finish.

B's time under the flood over its idle time (medians) is the figure; target <= 5. Also from
the ledger, per B document: the wait for a parse worker, the parse, the wait for an embed
worker, the embedding; and A's documents succeeded per second while B's were measured. Without
a cap (`--cap none`) B's document waits behind every one of A's. Prints a table, then one JSON
line with every figure."""

from __future__ import annotations

import argparse
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
    stop_on_sigterm,
    table,
    workdir,
)

RATIO_TARGET = 5.0
FLOODER, SINGLE, WARMUP = "bench-a", "bench-b", "bench-warmup"
WARMUP_DOCS = 6  # uploaded at once: more than the parse and embed pools have processes
FINAL = {"succeeded", "failed", "dead", "cancelled"}
PARTS = ("parse_wait_s", "parse_s", "embed_wait_s", "embed_s")  # medians, from the ledger


def upload(client: Any, path: Path) -> str:
    with path.open("rb") as fh:
        resp = client.post("/v1/documents", files={"file": (path.name, fh, "text/plain")})
    resp.raise_for_status()
    return str(resp.json()["job_id"])


def flood(url: str, files: list[Path], *, workspace: str = FLOODER,
          threads: int = 4) -> list[str]:
    """Upload every file into `workspace` from a few client threads; the job ids."""
    import httpx

    job_ids: list[str] = []
    pending = iter(files)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"X-Workspace": workspace}, timeout=120) as c:
            while True:
                with lock:
                    path = next(pending, None)
                if path is None:
                    return
                job_id = upload(c, path)
                with lock:
                    job_ids.append(job_id)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return job_ids


def time_to_succeeded(url: str, path: Path, *, workspace: str, timeout: float) -> dict[str, Any]:
    """Upload `path` into `workspace` and poll its job until final: seconds from the POST to
    the GET that shows it `succeeded` (None past `timeout`)."""
    import httpx

    with httpx.Client(base_url=url, headers={"X-Workspace": workspace}, timeout=60) as c:
        began = time.monotonic()
        job_id = upload(c, path)
        held = c.get(f"/v1/jobs/{job_id}").json()["held"]
        while time.monotonic() - began < timeout:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in FINAL:
                seconds = time.monotonic() - began
                if job["state"] != "succeeded":
                    raise RuntimeError(f"B's document ended {job['state']}: {job['error']}")
                return {"seconds": seconds, "job_id": job_id, "held": held,
                        **breakdown(job_id)}
            time.sleep(0.02)
    return {"seconds": None, "job_id": job_id, "held": held}


class FloodWatch(threading.Thread):
    """A's jobs in flight (most seen at once), held and succeeded, sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="flood-watch")
        self.peak_in_flight = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        from models import fairness
        from sluice.db import read_scope

        while not self.stop_event.wait(0.1):
            with read_scope() as session:
                room = fairness.room(session, workspace_id=FLOODER, lane=fairness.INGEST)
            self.peak_in_flight = max(self.peak_in_flight, room.in_flight)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def breakdown(job_id: str) -> dict[str, float]:
    """Where one job's time went, from the ledger: waiting for a parse worker (created → parse
    started), parsing, waiting for an embed worker (parse ended → embed started), embedding."""
    from datetime import UTC

    from sqlalchemy import select

    from models import Job, JobAttempt
    from sluice.db import read_scope

    def t(value: Any) -> float:
        return float((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())

    with read_scope() as session:
        job = session.get_one(Job, job_id)
        attempts = {a.stage: a for a in session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.id))}
        parse, embed = attempts["parse"], attempts["embed"]
        return {
            "parse_wait_s": round(t(parse.started_at) - t(job.created_at), 3),
            "parse_s": round(t(parse.ended_at) - t(parse.started_at), 3),
            "embed_wait_s": round(t(embed.started_at) - t(parse.ended_at), 3),
            "embed_s": round(t(embed.ended_at) - t(embed.started_at), 3),
        }


def wait_final(job_ids: list[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = flood_states(job_ids)
        if sum(n for state, n in states.items() if state in FINAL) == len(job_ids):
            return
        time.sleep(0.2)
    raise RuntimeError(f"warm-up documents not final after {timeout}s")


def flood_states(job_ids: list[str]) -> dict[str, int]:
    """A's jobs by state (`held` apart from the other queued ones)."""
    from collections import Counter

    from sqlalchemy import select

    from models import Job
    from sluice.db import read_scope

    states: Counter[str] = Counter()
    with read_scope() as session:
        for start in range(0, len(job_ids), 500):
            rows = session.execute(select(Job.state, Job.held).where(
                Job.id.in_(job_ids[start:start + 500])))
            states.update("held" if held and state == "queued" else state
                          for state, held in rows)
    return dict(states)


def main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=2000, help="workspace A's flood")
    parser.add_argument("--samples", type=int, default=5, help="B's documents, idle and flooded")
    parser.add_argument("--cap", help="SLUICE_WORKSPACE_INFLIGHT_CAP (default: the setting's)")
    parser.add_argument("--b-timeout", type=float, default=900,
                        help="give up on one of B's documents after this long (s)")
    parser.add_argument("--tagger-cache", type=Path, help="reuse a trained tagger from here")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args()

    from pipelines.nlp.training import ensure_tagger
    from sluice.db import dispose_engine
    from sluice.settings import get_settings
    from tests import corpus_harness as harness
    from tests.faults.harness import make_corpus
    from tests.stack import Stack

    with workdir("sluice-bench-fairness-", keep=args.keep) as work:
        tagger = ensure_tagger(DATA / "nlp" / "ud-english-ewt", args.tagger_cache or work / "nlp")
        env = {"SLUICE_DATA_DIR": str(work / "data"), "SLUICE_TAGGER_PATH": str(tagger)}
        if args.cap:
            env["SLUICE_WORKSPACE_INFLIGHT_CAP"] = args.cap
        configure(env)
        cap = get_settings().workspace_inflight_cap
        files = make_corpus(work / "corpus", WARMUP_DOCS + 2 * args.samples + args.docs)
        warmup, singles, flooding = (files[:WARMUP_DOCS],
                                     files[WARMUP_DOCS:WARMUP_DOCS + 2 * args.samples],
                                     files[WARMUP_DOCS + 2 * args.samples:])
        stacks: list[Stack] = []
        watch = FloodWatch()
        try:
            factory = harness.stack_factory(env, work / "logs", stacks)
            api = harness.start_stacks(factory)[0]
            factory(workers=0, api=False, beat=True)  # the reconciler, as `sluice up` runs it
            log(f"stack up; cap {cap}; {len(warmup)} warm-up documents")
            wait_final(flood(api.url, warmup, workspace=WARMUP), timeout=args.b_timeout)

            idle = []
            for path in singles[:args.samples]:
                idle.append(time_to_succeeded(api.url, path, workspace=SINGLE,
                                              timeout=args.b_timeout))
                log(f"idle: B's document succeeded in {idle[-1]['seconds']:.2f}s")

            log(f"workspace A uploads {len(flooding)} documents")
            watch.start()
            began = time.monotonic()
            a_jobs = flood(api.url, flooding)
            upload_s = time.monotonic() - began
            a_at_b_submit = flood_states(a_jobs)
            measured_from = time.monotonic()
            log(f"A's {len(a_jobs)} accepted in {upload_s:.0f}s; A now: {a_at_b_submit}")

            flooded = []
            for path in singles[args.samples:]:
                sample = time_to_succeeded(api.url, path, workspace=SINGLE,
                                           timeout=args.b_timeout)
                sample["a_then"] = flood_states(a_jobs)
                flooded.append(sample)
                seconds = sample["seconds"]
                log(f"under the flood: B's document "
                    f"{'timed out' if seconds is None else f'succeeded in {seconds:.2f}s'}; "
                    f"A then: {sample['a_then']}")
            watch.stop()
            a_end = flood_states(a_jobs)
            a_rate = ((a_end.get("succeeded", 0) - a_at_b_submit.get("succeeded", 0))
                      / (time.monotonic() - measured_from))
        except BaseException:
            for s in stacks:
                print(s.logs(), file=sys.stderr)
            raise
        finally:
            if watch.is_alive():
                watch.stop()
            for s in stacks:  # tear down: A's remaining documents are abandoned
                s.stop()
            dispose_engine()

    idle_s = [s["seconds"] for s in idle]
    flood_s = [s["seconds"] for s in flooded]
    idle_median = statistics.median(idle_s)
    finished = [s for s in flood_s if s is not None]
    flood_median = statistics.median(finished) if len(finished) == len(flood_s) else None
    ratio = round(flood_median / idle_median, 2) if flood_median is not None else None
    ok = ratio is not None and ratio <= RATIO_TARGET

    print()
    print(f"Fairness: workspace B's one document (a SciFact abstract) to `succeeded`, idle and "
          f"while workspace A has {len(a_jobs)} documents queued; in-flight cap per workspace "
          f"{cap}; embedded default, parse prefork 2, embed prefork 1")
    headers = ("B's document", "samples", "median s", "min s", "max s", *PARTS,
               "B held at upload", "A succeeded when B done")

    def parts(samples: list[dict[str, Any]]) -> list[float]:
        return [statistics.median(s[k] for s in samples) if all(k in s for s in samples)
                else float("nan") for k in PARTS]

    rows: list[tuple[Any, ...]] = [
        ("idle", len(idle_s), idle_median, min(idle_s), max(idle_s), *parts(idle),
         sum(bool(s["held"]) for s in idle), "-"),
        (f"under A's flood of {len(a_jobs)}", len(flood_s),
         float("nan") if flood_median is None else flood_median,
         min(finished, default=float("nan")), max(finished, default=float("nan")),
         *parts(flooded), sum(bool(s["held"]) for s in flooded),
         ", ".join(str(s["a_then"].get("succeeded", 0)) for s in flooded)),
    ]
    print(table(headers, rows))
    print(f"ratio (median under the flood / median idle): {ratio} (target <= {RATIO_TARGET}: "
          f"{'met' if ok else 'MISSED'}); A's uploads took {upload_s:.0f}s, its documents "
          f"succeeded at {a_rate:.2f}/s meanwhile; A's jobs in flight "
          f"at most {watch.peak_in_flight} at once (cap {cap}); A when B's first upload came: "
          f"{a_at_b_submit}; A at the end: {a_end}")
    print(machine_line())
    print_json({
        "docs": len(a_jobs), "cap": cap, "samples": args.samples,
        "idle_s": [round(s, 3) for s in idle_s], "idle_median_s": round(idle_median, 3),
        "flood_s": [None if s is None else round(s, 3) for s in flood_s],
        "flood_median_s": None if flood_median is None else round(flood_median, 3),
        "ratio": ratio, "ratio_target": RATIO_TARGET, "ratio_ok": ok,
        "idle_parts_s": dict(zip(PARTS, parts(idle), strict=True)),
        "flood_parts_s": dict(zip(PARTS, parts(flooded), strict=True)),
        "a_upload_s": round(upload_s, 1), "a_at_b_submit": a_at_b_submit,
        "a_succeeded_when_b_done": [s["a_then"].get("succeeded", 0) for s in flooded],
        "a_at_end": a_end, "a_docs_per_s": round(a_rate, 2),
        "a_in_flight_peak": watch.peak_in_flight, **machine(),
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
