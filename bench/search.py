"""Search and answer latency at 10k and 100k chunks, on PostgreSQL (pgvector HNSW) and on the
embedded default (SQLite + sqlite-vec), against exact brute-force search in numpy over the same
vectors.

    .venv/bin/python bench/search.py [--sizes 10000,100000] [--databases postgres,sqlite]
                                     [--queries 300] [--answers 30] [--noise 0.025]

The index is built by inserting chunks with their vectors directly (as bench/scifact.py does):
the real SciFact chunks (`chunk_elements` over each abstract, embedded once by the workers'
`Embedder` and cached in --cache-dir), and past those, synthetic chunks: a real chunk's text
with its vector plus Gaussian noise (per-dimension std --noise, re-normalised). Queries are the
SciFact test claims, encoded by the API's query encoder (`NumpyQueryEncoder`).

For each database and size, with the real API (uvicorn) and a real answer worker running:

- `POST /v1/search` (hybrid, the default; and dense), top 10, one client, p50/p95;
- a full answer job, `POST /v1/answers?wait=60` (job row, broker, worker, hybrid retrieval,
  cited answer, ledger), p50/p95;
- the limit, in this process over the same stored vectors: query encoding (the API's encoder,
  one BLAS thread as in the API) + exact cosine top 10 in numpy, p50/p95;
- recall@10 of `/v1/search?mode=dense` against the exact top 10 (target >= 0.95).

- the answer's own work without the job system (query encoding by the workers' `Embedder`,
  `hybrid_search`, the extractive generator) in this process, for the same questions: the
  answer job's ratio to it is the job system's share.

Prints a table, then one JSON line with every figure."""

from __future__ import annotations

import os

# The API's query encoder runs with one BLAS thread (sluice.processes.API_ENV); so does the limit.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    DATA,
    Postgres,
    configure,
    log,
    machine,
    machine_line,
    pct,
    print_json,
    ratio,
    redis_available,
    redis_prefix,
    stop_on_sigterm,
    table,
    workdir,
)

SCIFACT = DATA / "scifact"
WORKSPACE = "bench-search"
TOP_K = 10
DOCS_PER_TRANSACTION = 256
EMBED_STEP = 512  # chunks embedded between two saves of the cache
RECALL_TARGET = 0.95
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice-bench"


# The chunks and their vectors ---------------------------------------------------------------
@dataclass(frozen=True)
class RealChunk:
    corpus_id: str
    order: int
    text: str
    page: int | None
    section: str | None
    meta: dict[str, Any]


def real_chunks() -> list[RealChunk]:
    """Every SciFact chunk as the parse stage would store it, in corpus order."""
    from scifact import chunk_corpus, read_corpus

    from sluice.settings import get_settings

    docs = read_corpus(SCIFACT / "corpus.jsonl")
    drafts = chunk_corpus(docs, max_words=get_settings().chunk_max_words)
    return [RealChunk(d.corpus_id, c.order, c.text, c.page, c.section, dict(c.metadata))
            for d, doc_drafts in zip(docs, drafts, strict=True) for c in doc_drafts]


def cached_vectors(chunks: Sequence[RealChunk], *, cache_dir: Path,
                   needed: int | None = None) -> np.ndarray:
    """The vectors of the first `needed` chunks (default all) by the workers' `Embedder`, cached
    by corpus, chunking and model (grown in steps, so an interrupted first run keeps what it
    embedded)."""
    from pipelines.embedding import Embedder, default_model_path
    from sluice.settings import get_settings

    settings = get_settings()
    embedder = Embedder(model_path=settings.embedding_model_path or default_model_path(),
                        batch_size=settings.embedding_batch_size,
                        threads=settings.embedding_threads)
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(f"{c.corpus_id}\0{c.order}\0{c.text}\0".encode())
    digest.update(embedder.model_version.encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"scifact-chunks-{digest.hexdigest()[:16]}.npy"
    needed = len(chunks) if needed is None else min(needed, len(chunks))
    vectors = np.load(path) if path.exists() else np.zeros((0, 384), dtype=np.float32)
    if len(vectors) >= needed:
        log(f"chunk vectors: {needed} from the cache {path}")
        return vectors[:needed]
    log(f"embedding {needed - len(vectors)} chunks once (cached in {path})")
    started = time.perf_counter()
    done_before = len(vectors)
    while len(vectors) < needed:
        step = chunks[len(vectors): len(vectors) + EMBED_STEP]
        vectors = np.concatenate([vectors, embedder.encode([c.text for c in step])])
        np.save(path.with_suffix(".tmp.npy"), vectors)
        os.replace(path.with_suffix(".tmp.npy"), path)
        rate = (len(vectors) - done_before) / (time.perf_counter() - started)
        log(f"  embedded {len(vectors)}/{needed} chunks ({rate:.1f}/s)")
    return vectors[:needed]


def synthetic_vectors(real: np.ndarray, count: int, *, noise: float, seed: int = 0) -> np.ndarray:
    """`count` vectors: real vector i % len(real) plus N(0, noise²) per dimension, normalised."""
    rng = np.random.default_rng(seed)
    sources = np.arange(count) % len(real)
    out = real[sources] + rng.normal(0.0, noise, size=(count, real.shape[1])).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


# The index -------------------------------------------------------------------------------------
@dataclass
class Corpus:
    chunks: list[RealChunk]
    vectors: np.ndarray  # real chunks' vectors
    noise: float
    inserted: int = 0
    synthetic_cos: list[float] = field(default_factory=list)

    def chunk(self, i: int) -> tuple[RealChunk, int]:
        """Chunk i of the index: (the real chunk it is or copies, copy round; 0 = real)."""
        return self.chunks[i % len(self.chunks)], i // len(self.chunks)


def insert_chunks(corpus: Corpus, upto: int, *, model_name: str, model_version: str) -> float:
    """Insert chunks [corpus.inserted, upto) with their vectors, one transaction per group of
    documents; returns the seconds spent. A real abstract is one document; each copy round of
    an abstract another (its filename `corpus_id~round`)."""
    from sqlalchemy import insert

    from models import Chunk, Document, DocumentStatus
    from models.entities import new_id
    from sluice.db import session_scope

    start, n_real = corpus.inserted, len(corpus.chunks)
    if upto <= start:
        return 0.0
    synth_from = max(start, n_real)
    synth = (synthetic_vectors(corpus.vectors, upto - synth_from, noise=corpus.noise,
                               seed=synth_from) if upto > n_real else np.zeros((0, 384)))
    if len(synth):
        srcs = corpus.vectors[np.arange(synth_from, upto) % n_real]
        corpus.synthetic_cos.extend(np.einsum("ij,ij->i", synth, srcs).tolist())

    def vector(i: int) -> np.ndarray:
        return corpus.vectors[i] if i < n_real else synth[i - synth_from]

    # Group consecutive chunks of the same (abstract, round) into one document.
    groups: list[list[int]] = []
    for i in range(start, upto):
        real, rnd = corpus.chunk(i)
        if groups and corpus.chunk(groups[-1][0])[0].corpus_id == real.corpus_id \
                and corpus.chunk(groups[-1][0])[1] == rnd:
            groups[-1].append(i)
        else:
            groups.append([i])
    started = time.perf_counter()
    for g in range(0, len(groups), DOCS_PER_TRANSACTION):
        doc_rows, chunk_rows = [], []
        for members in groups[g: g + DOCS_PER_TRANSACTION]:
            real, rnd = corpus.chunk(members[0])
            name = real.corpus_id if rnd == 0 else f"{real.corpus_id}~{rnd}"
            doc_id = new_id()
            doc_rows.append({
                "id": doc_id, "workspace_id": WORKSPACE, "filename": name,
                "content_type": "text/plain", "sha256": hashlib.sha256(name.encode()).hexdigest(),
                "size_bytes": sum(len(corpus.chunk(i)[0].text) for i in members),
                "status": DocumentStatus.READY, "chunk_count": len(members),
            })
            for i in members:
                c = corpus.chunk(i)[0]
                chunk_rows.append({
                    "workspace_id": WORKSPACE, "document_id": doc_id, "ord": c.order,
                    "text": c.text, "page": c.page, "section": c.section, "meta": c.meta,
                    "embedding": vector(i), "embedding_model": model_name,
                    "embedding_version": model_version,
                })
        with session_scope() as session:
            session.execute(insert(Document), doc_rows)
            session.execute(insert(Chunk), chunk_rows)
        done = sum(len(x) for x in groups[: g + DOCS_PER_TRANSACTION])
        if (g // DOCS_PER_TRANSACTION) % 20 == 0:
            log(f"  inserted {start + done}/{upto} chunks "
                f"({done / (time.perf_counter() - started):.0f}/s)")
    corpus.inserted = upto
    return time.perf_counter() - started


def stored_index() -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids, vectors) as stored in the database: the exact search's input."""
    from sqlalchemy import select

    from models import Chunk
    from sluice.db import read_scope

    with read_scope() as session:
        rows = session.execute(select(Chunk.id, Chunk.embedding)
                               .where(Chunk.workspace_id == WORKSPACE)).all()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, np.stack([np.asarray(r[1], dtype=np.float32) for r in rows])


# Measurements ----------------------------------------------------------------------------------
@dataclass
class Row:
    database: str
    chunks: int
    synthetic: int
    insert_s: float
    exact_ms: list[float]
    encode_ms: list[float]
    limit_ms: list[float]
    search_ms: list[float]
    dense_ms: list[float]
    answer_ms: list[float]
    answer_inproc_ms: list[float]
    recall: float
    answers_ok: int

    def figures(self) -> dict[str, Any]:
        lim50, lim95 = pct(self.limit_ms, 50), pct(self.limit_ms, 95)
        out: dict[str, Any] = {
            "database": self.database, "chunks": self.chunks, "synthetic_chunks": self.synthetic,
            "insert_s": round(self.insert_s, 1),
            "recall_at_10": round(self.recall, 4), "recall_target": RECALL_TARGET,
            "recall_ok": self.recall >= RECALL_TARGET,
            "answers_succeeded": self.answers_ok, "answers": len(self.answer_ms),
        }
        for name, values in (("limit", self.limit_ms), ("exact", self.exact_ms),
                             ("encode", self.encode_ms), ("search", self.search_ms),
                             ("search_dense", self.dense_ms), ("answer", self.answer_ms),
                             ("answer_inproc", self.answer_inproc_ms)):
            out[f"{name}_p50_ms"] = round(pct(values, 50), 2)
            out[f"{name}_p95_ms"] = round(pct(values, 95), 2)
        for name, values in (("search", self.search_ms), ("search_dense", self.dense_ms),
                             ("answer", self.answer_ms)):
            out[f"{name}_p50_ratio"] = ratio(pct(values, 50), lim50)
            out[f"{name}_p95_ratio"] = ratio(pct(values, 95), lim95)
        # The answer job against its own work done in one process: the job system's share.
        out["answer_job_ratio_p50"] = ratio(pct(self.answer_ms, 50),
                                            pct(self.answer_inproc_ms, 50))
        return out


def answer_in_process(questions: Sequence[str]) -> list[float]:
    """The answer stage's own work, without the job system: what `tasks.answer._answer` runs
    (query encoding by the workers' `Embedder`, `hybrid_search`, the extractive generator), in
    this process, timed per question."""
    from sluice.db import session_scope
    from sluice.retrieve import hybrid_search
    from sluice.settings import get_settings
    from workers import resources

    embedder, generator = resources.embedder(), resources.generator()
    settings = get_settings()
    out = []
    for i, question in enumerate(["warm-up: load the model", *questions]):
        t0 = time.perf_counter()
        with session_scope() as session:
            passages = hybrid_search(
                session, workspace_id=WORKSPACE, query=question,
                encode_query=lambda q: embedder.encode([q])[0], top_k=5,
                candidates=settings.search_candidates, embedding_version=embedder.model_version)
        generator.generate(question, passages)
        if i:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def exact_top(matrix: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = matrix @ query
    top = np.argpartition(-scores, k)[:k]
    return ids[top[np.argsort(-scores[top], kind="stable")]]


def measure(stack: Any, *, database: str, corpus: Corpus, synthetic: int, insert_s: float,
            queries: list[str], query_vectors: np.ndarray, encoder: Any,
            answers: int) -> Row:
    import httpx

    ids, matrix = stored_index()
    encode_ms: list[float] = []
    exact_ms: list[float] = []
    search_ms: list[float] = []
    dense_ms: list[float] = []
    hits = 0
    with httpx.Client(base_url=stack.url, headers={"X-Workspace": WORKSPACE},
                      timeout=120) as client:
        client.post("/v1/search", json={"query": "warm-up", "top_k": TOP_K}).raise_for_status()
        log(f"{database} {len(ids)} chunks: {len(queries)} queries, each through the limit and "
            f"the API (hybrid, dense), one after the other")
        for query, vector in zip(queries, query_vectors, strict=True):
            t0 = time.perf_counter()
            encoder.encode_one(query)
            t1 = time.perf_counter()
            exact = set(exact_top(matrix, ids, vector, TOP_K).tolist())
            t2 = time.perf_counter()
            encode_ms.append((t1 - t0) * 1000)
            exact_ms.append((t2 - t1) * 1000)
            for mode, sink in (("hybrid", search_ms), ("dense", dense_ms)):
                t0 = time.perf_counter()
                resp = client.post("/v1/search", json={"query": query, "top_k": TOP_K,
                                                       "mode": mode})
                sink.append((time.perf_counter() - t0) * 1000)
                resp.raise_for_status()
                if mode == "dense":
                    hits += len({h["chunk_id"] for h in resp.json()["results"]} & exact)
        limit_ms = [e + c for e, c in zip(exact_ms, encode_ms, strict=True)]
        log(f"{database} {len(ids)} chunks: {answers} answer jobs through the API and a worker")
        answer_ms, ok = [], 0
        warm = client.post("/v1/answers", params={"wait": 120},
                           json={"question": "warm-up: load the model", "top_k": 5})
        if warm.status_code != 200:
            raise RuntimeError(f"answer warm-up: {warm.status_code} {warm.text[:300]}")
        for query in queries[:answers]:
            t0 = time.perf_counter()
            resp = client.post("/v1/answers", params={"wait": 60},
                               json={"question": query, "top_k": 5})
            answer_ms.append((time.perf_counter() - t0) * 1000)
            ok += resp.status_code == 200 and resp.json().get("state") == "succeeded"
    log(f"{database} {len(ids)} chunks: the same answers computed in this process")
    inproc_ms = answer_in_process(queries[:answers])
    return Row(database=database, chunks=len(ids), synthetic=synthetic, insert_s=insert_s,
               exact_ms=exact_ms, encode_ms=encode_ms, limit_ms=limit_ms, search_ms=search_ms,
               dense_ms=dense_ms, answer_ms=answer_ms, answer_inproc_ms=inproc_ms,
               recall=hits / (TOP_K * len(queries)), answers_ok=ok)


def run_database(database: str, *, args: argparse.Namespace, corpus_chunks: list[RealChunk],
                 real_vectors: np.ndarray, queries: list[str], query_vectors: np.ndarray,
                 encoder: Any, work: Path) -> list[Row]:
    from sqlalchemy import text

    from models import Workspace
    from pipelines.embedding import default_model_path, model_name_of, model_version_of
    from sluice.db import dispose_engine, session_scope
    from sluice.processes import worker_command
    from tests.stack import Stack

    corpus = Corpus(chunks=corpus_chunks, vectors=real_vectors, noise=args.noise)
    model_path = Path(default_model_path())
    pg = Postgres() if database == "postgres" else None
    use_redis = database == "postgres" and redis_available()
    rows: list[Row] = []
    try:
        with redis_prefix("search") as prefix:
            env = {"SLUICE_DATA_DIR": str(work / database),
                   "SLUICE_QUOTA_ANSWERS_PER_MINUTE": "none"}
            if pg is not None:
                env["SLUICE_DATABASE_URL"] = pg.database()
            if use_redis:
                env.update(SLUICE_BROKER_URL="redis://127.0.0.1:6379/0",
                           SLUICE_BROKER_KEY_PREFIX=prefix)
            configure(env)
            with session_scope() as session:
                session.add(Workspace(id=WORKSPACE))
            stack = Stack(env=env, log_dir=work / f"logs-{database}", workers=0, api=True)
            stack._spawn("worker-answer", worker_command("answer"))  # its real pool (threads)
            stack.start()
            try:
                for size in args.sizes:
                    log(f"{database}: inserting chunks up to {size}")
                    insert_s = insert_chunks(corpus, size, model_name=model_name_of(model_path),
                                             model_version=model_version_of(model_path))
                    if pg is not None:
                        with session_scope() as session:
                            session.execute(text("ANALYZE chunks"))
                            session.execute(text("ANALYZE documents"))
                    rows.append(measure(
                        stack, database=database, corpus=corpus,
                        synthetic=max(0, size - len(corpus_chunks)), insert_s=insert_s,
                        queries=queries, query_vectors=query_vectors, encoder=encoder,
                        answers=args.answers))
                    log(f"{database} {size}: " + str({k: v for k, v in rows[-1].figures().items()
                                                      if "p50" in k or "recall" in k}))
            except BaseException:
                print(stack.logs(), file=sys.stderr)
                raise
            finally:
                stack.stop()
                dispose_engine()
    finally:
        if pg is not None:
            pg.close()
    return rows


# Main --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10000,100000",
                        help="index sizes in chunks, ascending (default 10000,100000)")
    parser.add_argument("--databases", default="postgres,sqlite")
    parser.add_argument("--queries", type=int, default=300, help="SciFact test claims used")
    parser.add_argument("--answers", type=int, default=30, help="answer jobs per size")
    parser.add_argument("--noise", type=float, default=0.025,
                        help="per-dimension std of the noise added to synthetic chunks' vectors")
    parser.add_argument("--real", type=int, default=None, metavar="N",
                        help="use only the first N real chunks, the rest synthetic (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    databases = [d for d in args.databases.split(",") if d]

    with workdir("sluice-bench-search-", keep=args.keep) as work:
        configure({"SLUICE_DATA_DIR": str(work / "prep")})
        chunks = real_chunks()
        vectors = cached_vectors(chunks, cache_dir=args.cache_dir,
                                 needed=min(args.sizes[-1], args.real or len(chunks)))
        chunks = chunks[: len(vectors)]

        from scifact import read_queries

        from pipelines.embedding import default_model_path
        from pipelines.query_encoder import NumpyQueryEncoder

        queries = list(read_queries(SCIFACT / "queries_test.jsonl").values())[: args.queries]
        encoder = NumpyQueryEncoder(default_model_path())
        query_vectors = np.stack([encoder.encode_one(q) for q in queries]).astype(np.float32)

        rows: list[Row] = []
        for database in databases:
            rows += run_database(database, args=args, corpus_chunks=chunks,
                                 real_vectors=vectors, queries=queries,
                                 query_vectors=query_vectors, encoder=encoder, work=work)

    figures = [r.figures() for r in rows]
    print()
    print(f"Search and answer latency, {len(queries)} SciFact test claims (answers: the first "
          f"{args.answers}), top {TOP_K}; {len(chunks)} real SciFact chunks, the rest synthetic "
          f"(a real chunk's text, its vector + N(0, {args.noise}^2) noise per dimension, "
          f"normalised)")
    headers = ("database", "chunks", "synthetic", "limit p50/p95 ms", "/search p50/p95 ms",
               "ratio p50", "dense p50/p95 ms", "ratio p50", "answer p50/p95 ms",
               "in-process p50 ms", "ratio p50", "recall@10")
    body = []
    for f in figures:
        body.append((
            f["database"], f["chunks"], f["synthetic_chunks"],
            f"{f['limit_p50_ms']:.1f} / {f['limit_p95_ms']:.1f}",
            f"{f['search_p50_ms']:.1f} / {f['search_p95_ms']:.1f}", f["search_p50_ratio"],
            f"{f['search_dense_p50_ms']:.1f} / {f['search_dense_p95_ms']:.1f}",
            f["search_dense_p50_ratio"],
            f"{f['answer_p50_ms']:.0f} / {f['answer_p95_ms']:.0f}", f["answer_inproc_p50_ms"],
            f["answer_job_ratio_p50"],
            f"{f['recall_at_10']:.3f}" + ("" if f["recall_ok"] else " (< 0.95)"),
        ))
    print(table(headers, body))
    print("limit = query encoding (the API's NumpyQueryEncoder, 1 BLAS thread) + exact cosine "
          "top 10 in numpy over the stored vectors (in memory); p50 of each part: "
          + ", ".join(f"{f['database']} {f['chunks']}: encode {f['encode_p50_ms']:.1f} + "
                      f"exact {f['exact_p50_ms']:.1f} ms" for f in figures))
    print("/search = POST /v1/search (hybrid, the default), dense = mode dense (ratio = Sluice / "
          "limit); answer = POST /v1/answers?wait=60, a full answer job, against its own work "
          "(query encoding by the workers' Embedder, hybrid_search, the extractive generator) "
          "run in this process (ratio = job / in-process); recall@10 = /v1/search?mode=dense's "
          "top 10 against the exact top 10 (target >= 0.95)")
    synthetic_cos = None
    if any(r.synthetic for r in rows):
        sample = synthetic_vectors(vectors, len(vectors), noise=args.noise)
        synthetic_cos = round(float(np.mean(np.einsum("ij,ij->i", sample, vectors))), 4)
        print(f"synthetic chunks: mean cosine to the real vector they copy {synthetic_cos}")
    print("inserted with vectors (no embedding): "
          + ", ".join(f"{f['database']} to {f['chunks']} in {f['insert_s']:.0f}s"
                      for f in figures))
    print(machine_line())
    print_json({"rows": figures, "queries": len(queries), "answers": args.answers,
                "real_chunks": len(chunks), "noise_std": args.noise,
                "synthetic_mean_cos": synthetic_cos,
                "recall_ok": all(f["recall_ok"] for f in figures), **machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
