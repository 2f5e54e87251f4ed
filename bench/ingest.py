"""Embedding efficiency: documents ingested end to end, against the limit measured in the same run.

    .venv/bin/python bench/ingest.py                    # 1,000 SciFact abstracts + the 20 10-Q PDFs
    .venv/bin/python bench/ingest.py --docs 4000        # most of the SciFact abstracts
    .venv/bin/python bench/ingest.py --only small --docs 200    # a smoke run

Two corpora: many small documents (SciFact abstracts of 40 words or more, each written out as a
.txt file by the fault harness's `make_corpus`: title, blank line, abstract) and a few large
ones (the 10-Q PDFs of ../shared/data/qa/docugami-sec-10-q).
Each goes end to end through the real API (uvicorn), the broker and real worker processes on the
embedded default (SQLite + filesystem broker; parse prefork 2 (`sluice up` runs 1: with 1,
a run here measured 0.65 of raw encode against 0.72 with 2), embed prefork 2 with one model
thread each as in `sluice up`, answer+maintenance 1; pool processes recycled after as many tasks
as `sluice up`'s: parse 50, embed 1,000) — from the first upload to the last job
`succeeded`.

The limit, measured afterwards in this process with the workers stopped (so nothing competes):

- `encode`: the same chunks (read back from the database) encoded by
  `SentenceTransformer.encode` directly, at its best batch size of 1/4/8/16/32/64 (chosen on a
  sample); the issue's target is end-to-end chunks/s >= 0.85 of this for the small corpus;
- `onnx`: the same chunks through Sluice's own encoder (`Embedder`, onnx backend) directly;
- `partition`: the same files through `parse_document` directly, one after another.

Ratios: `vs_encode` = end-to-end chunks/s / raw-encode chunks/s; `vs_encode_and_partition` =
(encode s + partition s) / end-to-end s (the pipeline against doing its two heavy steps back
to back with nothing else). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import log, machine, print_json, table, worker_flag  # noqa: E402
from tests import corpus_harness as harness  # noqa: E402
from tests.faults.harness import make_corpus  # noqa: E402
from tests.stack import FINAL, Stack  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TEN_Q = DATA / "qa" / "docugami-sec-10-q" / "data" / "v1" / "docs"
BATCH_SIZES = (1, 4, 8, 16, 32, 64)
WARM_UP_DOCS = 6
UPLOADERS = 8


def _ingest(client: Any, files: list[Path]) -> list[str]:
    """Upload `files` (from `UPLOADERS` threads) and wait until every job is final."""
    from sqlalchemy import func, select

    from models import Job
    from sluice.db import read_scope

    with ThreadPoolExecutor(UPLOADERS) as pool:
        def upload(path: Path) -> str:
            with path.open("rb") as body:
                resp = client.post("/v1/documents", files={"file": (path.name, body)})
            resp.raise_for_status()
            return str(resp.json()["job_id"])

        job_ids = list(pool.map(upload, files))
    log(f"{len(files)} files uploaded; waiting for their jobs")
    while True:
        with read_scope() as session:
            done = session.scalar(select(func.count()).select_from(Job).where(
                Job.id.in_(job_ids), Job.state.in_(FINAL))) or 0
        if done == len(job_ids):
            return job_ids
        time.sleep(0.25)


def end_to_end(files: list[Path], warm_up: list[Path], env: dict[str, str], work: Path
               ) -> dict[str, Any]:
    """Every file through the API and the workers: the wall time from the first upload to the
    last final job, and the chunks they made. The workers are warm first (a few other
    documents ingested), as they are in service: their first task loads the parser and the
    model, which a long-running worker does once."""
    from sqlalchemy import func, select

    from models import Chunk, Job
    from sluice.db import read_scope

    stacks: list[Stack] = []
    try:
        harness.start_stacks(_service_factory(env, work / "logs", stacks))
        with stacks[0].client() as client:
            log(f"warming the workers with {len(warm_up)} other documents")
            _ingest(client, warm_up)
            load_before = machine()["loadavg"]
            cpu_before, machine_before = _cpu_by_process(stacks), _machine_cpu()
            started = time.perf_counter()
            job_ids = _ingest(client, files)
            wall_s = time.perf_counter() - started
            cpu_s = {name: round(seconds - cpu_before.get(name, 0.0), 2)
                     for name, seconds in _cpu_by_process(stacks).items()}
            machine_s = {key: round(seconds - machine_before[key], 2)
                         for key, seconds in _machine_cpu().items()}
        with read_scope() as session:
            states = dict(session.execute(
                select(Job.state, func.count()).where(Job.id.in_(job_ids))
                .group_by(Job.state)).all())
            documents = select(Job.document_id).where(Job.id.in_(job_ids))
            texts = list(session.scalars(select(Chunk.text).where(
                Chunk.document_id.in_(documents)).order_by(Chunk.id)))
    finally:
        for s in stacks:
            s.stop()
    chunks = len(texts)
    return {"files": len(files), "succeeded": states.get("succeeded", 0), "states": states,
            "chunks": chunks, "wall_s": wall_s,
            "chunks_per_s": chunks / wall_s, "docs_per_s": len(files) / wall_s,
            "loadavg_during": [load_before, machine()["loadavg"]],
            "cpu_s": cpu_s, "cpu_s_total": round(sum(cpu_s.values()), 2),
            "machine_cpu_s": machine_s, "_texts": texts}


def _service_factory(env: dict[str, str], log_dir: Path,
                     started: list[Stack]) -> Any:
    """The harness's stacks, each worker recycling its pool processes as `sluice up`'s worker
    for its queue does (`--max-tasks-per-child`; the tests' stacks keep Celery's configured
    default, 200 tasks, so an embed process would reload the model within this run)."""
    base = harness.stack_factory(env, log_dir, started)

    def factory(**kwargs: Any) -> Stack:
        tasks = worker_flag(kwargs["queues"], "--max-tasks-per-child")
        recycle = [] if tasks is None else ["--max-tasks-per-child", tasks]
        return base(**kwargs, worker_args=recycle)  # type: ignore[no-any-return]

    return factory


def _machine_cpu() -> dict[str, float]:
    """CPU seconds so far, over all CPUs: `busy` (user, system, interrupts; every process,
    this one's upload client, the kernel and other tenants), `steal` (taken by the
    hypervisor) and `idle` (idle and I/O wait); `client` is this process's own share of busy."""
    import psutil

    t, own = psutil.cpu_times(), psutil.Process().cpu_times()
    return {"busy": t.user + t.nice + t.system + t.irq + t.softirq,
            "steal": getattr(t, "steal", 0.0), "idle": t.idle + getattr(t, "iowait", 0.0),
            "client": own.user + own.system}


def _cpu_by_process(stacks: list[Stack]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each started process and its descendants,
    by name (api, worker-parse, ...): the live ones, plus what exited children left to their
    parents (a recycled pool process, a sandboxed parse child)."""
    import psutil

    used: dict[str, float] = {}
    for stack in stacks:
        for name, proc in stack.procs.items():
            try:
                root = psutil.Process(proc.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0.0
            for p in tree:
                try:
                    t = p.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system + t.children_user + t.children_system
            used[name] = total
    return used


def raw_encode(texts: list[str]) -> dict[str, Any]:
    """SentenceTransformer.encode directly at its best batch size (picked on a sample)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from pipelines.embedding import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    sample = texts[: min(len(texts), 256)]
    model.encode(sample[:32], batch_size=32)  # warm-up
    per_batch = {}
    for size in BATCH_SIZES:
        started = time.perf_counter()
        model.encode(sample, batch_size=size, normalize_embeddings=True)
        per_batch[size] = len(sample) / (time.perf_counter() - started)
    best = max(per_batch, key=lambda size: per_batch[size])
    started, cpu = time.perf_counter(), time.process_time()
    model.encode(texts, batch_size=best, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    return {"batch_size": best, "sample_chunks_per_s_by_batch": per_batch, "s": seconds,
            "cpu_s": time.process_time() - cpu, "chunks_per_s": len(texts) / seconds}


def onnx_encode(texts: list[str], graph_dir: Path) -> dict[str, Any]:
    from pipelines.embedding import Embedder

    embedder = Embedder.default(backend="onnx", graph_dir=graph_dir)
    embedder.encode(texts[:32])  # export/load and warm up
    started, cpu = time.perf_counter(), time.process_time()
    embedder.encode(texts)
    seconds = time.perf_counter() - started
    return {"s": seconds, "cpu_s": time.process_time() - cpu,
            "chunks_per_s": len(texts) / seconds}


def partition(files: list[Path], tagger: Path) -> dict[str, Any]:
    from pipelines.parsing import parse_document, warm_up

    warm_up(tagger)
    started, cpu = time.perf_counter(), time.process_time()
    for path in files:
        parse_document(path, filename=path.name, tagger_path=tagger)
    seconds = time.perf_counter() - started
    return {"s": seconds, "cpu_s": time.process_time() - cpu, "docs_per_s": len(files) / seconds}


def run(name: str, files: list[Path], warm_up: list[Path], env: dict[str, str], work: Path,
        tagger: Path) -> dict[str, Any]:
    log(f"[{name}] end to end")
    harness.configure({**env, "SLUICE_DATA_DIR": str(work / name)})
    e2e = end_to_end(files, warm_up, {**env, "SLUICE_DATA_DIR": str(work / name)},
                     work / name)
    texts = e2e.pop("_texts")
    log(f"[{name}] {e2e['chunks']} chunks in {e2e['wall_s']:.1f} s; the limit: raw encode")
    encode = raw_encode(texts)
    log(f"[{name}] onnx encoder directly")
    onnx = onnx_encode(texts, work / "graphs")
    log(f"[{name}] partition directly")
    parse = partition(files, tagger)
    return {
        "end_to_end": e2e, "encode": encode, "onnx_encode": onnx, "partition": parse,
        "vs_encode": e2e["chunks_per_s"] / encode["chunks_per_s"],
        "vs_onnx_encode": e2e["chunks_per_s"] / onnx["chunks_per_s"],
        "vs_encode_and_partition": (encode["s"] + parse["s"]) / e2e["wall_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000,
                        help="SciFact abstracts of 40 words or more (about 4,900 exist)")
    parser.add_argument("--only", choices=("small", "large"))
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every process, e.g. SLUICE_EMBEDDING_BACKEND=torch")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    parser.add_argument("--embed-concurrency", type=int, metavar="N", default=2,
                        help="embed pool processes, one model thread each unless --env sets "
                        "SLUICE_EMBEDDING_THREADS (default 2, as `sluice up`)")
    args = parser.parse_args()
    harness.WORKERS = tuple(
        (name, queues, args.embed_concurrency if name == "embed" else concurrency)
        for name, queues, concurrency in harness.WORKERS)

    from pipelines.nlp.training import ensure_tagger
    from sluice import processes

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-ingest-"))
    results: dict[str, Any] = {}
    try:
        tagger = ensure_tagger(DATA / "nlp" / "ud-english-ewt", work / "nlp")
        env = {"SLUICE_TAGGER_PATH": str(tagger), **processes.QUEUE_ENV["embed"],
               **dict(item.split("=", 1) for item in args.env)}
        # the first few abstracts warm the workers up; the measured ones come after them
        abstracts = make_corpus(work / "scifact", WARM_UP_DOCS + args.docs)
        warm_up = abstracts[:WARM_UP_DOCS]
        corpora = {
            "small": lambda: abstracts[WARM_UP_DOCS:],
            "large": lambda: sorted(TEN_Q.glob("*.pdf")),
        }
        for name, files in corpora.items():
            if args.only in (None, name):
                results[name] = run(name, files(), warm_up, env, work, tagger)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name, r in results.items():
        e2e = r["end_to_end"]
        rows.append([name, e2e["files"], e2e["succeeded"], e2e["chunks"], f"{e2e['wall_s']:.1f}",
                     f"{e2e['docs_per_s']:.2f}", f"{e2e['chunks_per_s']:.1f}",
                     f"{r['encode']['chunks_per_s']:.1f} (b{r['encode']['batch_size']})",
                     f"{r['onnx_encode']['chunks_per_s']:.1f}",
                     f"{r['partition']['docs_per_s']:.1f}",
                     f"{r['vs_encode']:.2f}", f"{r['vs_encode_and_partition']:.2f}"])
    print(table(["corpus", "files", "ok", "chunks", "e2e s", "docs/s", "chunks/s",
                 "ST encode/s", "onnx/s", "partition docs/s", "vs encode",
                 "vs encode+partition"], rows))
    for name, r in results.items():
        e2e = r["end_to_end"]
        shares = ", ".join(f"{proc} {seconds:.1f}" for proc, seconds in e2e["cpu_s"].items())
        print(f"{name}: CPU seconds during the end-to-end run ({e2e['wall_s']:.1f} s wall, "
              f"{machine()['cpus']} CPUs): {shares}; total {e2e['cpu_s_total']:.1f}; "
              f"raw encode alone {r['encode']['cpu_s']:.1f}, onnx alone "
              f"{r['onnx_encode']['cpu_s']:.1f}, partition alone {r['partition']['cpu_s']:.1f}")
        m = e2e["machine_cpu_s"]
        print(f"{name}: the whole machine during it: busy {m['busy']:.1f} CPU-s (Sluice "
              f"{e2e['cpu_s_total']:.1f}, this bench's upload client {m['client']:.1f}, the "
              f"kernel and everything else {m['busy'] - e2e['cpu_s_total'] - m['client']:.1f}), "
              f"steal {m['steal']:.1f}, idle {m['idle']:.1f}")
    if "small" in results:
        print(f"target: small corpus end-to-end >= 0.85 of raw encode: "
              f"{results['small']['vs_encode']:.2f}")
    summary = {"machine": machine(), **results,
               "settings": dict(item.split("=", 1) for item in args.env),
               "workers": [list(w) for w in harness.WORKERS]}
    print_json(summary)
    failed = any(r["end_to_end"]["succeeded"] != r["end_to_end"]["files"]
                 for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
