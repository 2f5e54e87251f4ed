"""SciFact retrieval benchmark: index the BEIR SciFact corpus through Sluice's own chunk, embed
and index code, then score dense, full-text and hybrid search with nDCG@10.

    .venv/bin/python bench/scifact.py [--limit-docs N] [--database-url URL] [--keep DIR]

Each abstract becomes one ready Document (filename = corpus id) holding a "Title" and a
"NarrativeText" element, chunked by `chunk_elements` with the configured word budget, embedded
by `Embedder` and bulk-inserted as Chunk rows with their vectors (the SQLite triggers or the
pgvector/tsvector indexes do the rest). The 300 test claims are then searched with
`hybrid_search` in each mode; chunks are collapsed to documents by best rank before scoring.

The dense check proves the embedding path faithful: every abstract is embedded once more as
MTEB does (title + " " + text, one vector, truncated by the model at 256 word-pieces) through the
same `Embedder`, searched exactly, and must land within 0.01 of all-MiniLM-L6-v2's published
0.64508. The chunked index itself scores higher (its chunks cover the whole abstract); exact
searches over its stored vectors separate what the chunking and what the vector index change.
The last output line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import make_url

from models import Chunk, Document, DocumentStatus, Workspace
from models.entities import new_id
from pipelines.chunking import chunk_elements
from pipelines.embedding import Embedder, default_model_path
from pipelines.query_encoder import NumpyQueryEncoder
from pipelines.retrieval import ndcg_at_k
from pipelines.types import ChunkDraft, Element, Passage
from sluice.db import dispose_engine, get_engine, session_scope
from sluice.migrate import upgrade
from sluice.retrieve import hybrid_search
from sluice.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
WORKSPACE_ID = "bench-scifact"
MODES = ("dense", "fulltext", "hybrid")
TOP_K_DOCS = 10
CHUNK_CANDIDATES = 100
"""Chunks retrieved per query before collapsing to documents: a split abstract takes several."""
DOCS_PER_TRANSACTION = 256
"""Documents embedded and inserted per step; each step writes in one short transaction."""
DENSE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Anchor:
    score: float
    source: str


ANCHORS = {
    "dense": Anchor(0.64508, "MTEB all-MiniLM-L6-v2"),
    "fulltext": Anchor(0.68736, "MTEB bm25s (Anserini BM25 0.6789)"),
    "hybrid": Anchor(0.68736, "no published hybrid: vs MTEB bm25s"),
}


@dataclass(frozen=True)
class CorpusDoc:
    corpus_id: str
    title: str
    text: str


@dataclass(frozen=True)
class IndexStats:
    docs: int
    chunks: int
    reused: bool
    model_load_s: float = 0.0
    chunk_s: float = 0.0
    embed_s: float = 0.0
    insert_s: float = 0.0
    total_s: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.embed_s if self.embed_s else 0.0


@dataclass(frozen=True)
class ModeResult:
    ndcg: float
    latencies_ms: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 95))


# Data ----------------------------------------------------------------------------------------


def read_corpus(path: Path) -> list[CorpusDoc]:
    with path.open(encoding="utf-8") as handle:
        return [CorpusDoc(corpus_id=row["_id"], title=row["title"], text=row["text"])
                for row in map(json.loads, handle)]


def read_queries(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8") as handle:
        return {row["_id"]: row["text"] for row in map(json.loads, handle)}


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id → {corpus id: relevance}; the file is a TSV with a header row."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


# Environment -------------------------------------------------------------------------------


def configure(*, data_dir: Path, database_url: str | None) -> None:
    """Point Sluice's settings at the benchmark's database before anything reads them."""
    os.environ["SLUICE_DATA_DIR"] = str(data_dir)
    if database_url:
        os.environ["SLUICE_DATABASE_URL"] = database_url
    else:
        # Never write the benchmark into whatever database the shell happens to point at.
        os.environ.pop("SLUICE_DATABASE_URL", None)
    get_settings.cache_clear()
    dispose_engine()


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


# Indexing ----------------------------------------------------------------------------------


def chunk_corpus(docs: Sequence[CorpusDoc], *, max_words: int) -> list[list[ChunkDraft]]:
    """Each abstract's chunks, as the parse stage would store them."""
    return [chunk_elements(document_elements(d), max_words=max_words) for d in docs]


def existing_index(
    docs: Sequence[CorpusDoc], drafts: Sequence[Sequence[ChunkDraft]], *, model_version: str
) -> bool:
    """Whether the workspace already holds exactly these chunks, embedded by this model (an
    earlier --keep run with the same corpus, chunker and model)."""
    with session_scope() as session:
        rows = session.execute(
            select(Document.filename, Chunk.ord, Chunk.text, Chunk.embedding_version)
            .join(Document, Document.id == Chunk.document_id)
            .where(Chunk.workspace_id == WORKSPACE_ID, Document.status == DocumentStatus.READY)
        ).all()
    if not rows or {r.embedding_version for r in rows} != {model_version}:
        return False
    stored = sorted((r.filename, r.ord, r.text) for r in rows)
    expected = sorted(
        (d.corpus_id, draft.order, draft.text)
        for d, doc_drafts in zip(docs, drafts, strict=True)
        for draft in doc_drafts
    )
    return stored == expected


def reset_workspace() -> None:
    """Create the benchmark workspace, dropping what an earlier, different run left in it."""
    with session_scope() as session:
        session.execute(delete(Chunk).where(Chunk.workspace_id == WORKSPACE_ID))
        session.execute(delete(Document).where(Document.workspace_id == WORKSPACE_ID))
        if session.get(Workspace, WORKSPACE_ID) is None:
            session.add(Workspace(id=WORKSPACE_ID))


def document_elements(doc: CorpusDoc) -> list[Element]:
    """An abstract as a parser would hand it over: its title, then its body."""
    return [Element(text=doc.title, category="Title"),
            Element(text=doc.text, category="NarrativeText")]


def index_corpus(
    docs: Sequence[CorpusDoc], drafts: Sequence[Sequence[ChunkDraft]], *, embedder: Embedder
) -> IndexStats:
    """Embed → insert, one short transaction per group of documents."""
    started = time.perf_counter()
    load_started = time.perf_counter()
    embedder.encode(["warm-up: load the model outside the timed region"])
    model_load_s = time.perf_counter() - load_started

    embed_s = insert_s = 0.0
    total_chunks = 0
    for start in range(0, len(docs), DOCS_PER_TRANSACTION):
        group = docs[start : start + DOCS_PER_TRANSACTION]
        group_drafts = drafts[start : start + DOCS_PER_TRANSACTION]
        t1 = time.perf_counter()
        vectors = embedder.encode([draft.text for doc_drafts in group_drafts
                                   for draft in doc_drafts])
        t2 = time.perf_counter()
        document_rows: list[dict[str, Any]] = []
        chunk_rows: list[dict[str, Any]] = []
        vector_iter = iter(vectors)
        for doc, doc_drafts in zip(group, group_drafts, strict=True):
            source = f"{doc.title}\n\n{doc.text}".encode()
            document_id = new_id()
            document_rows.append({
                "id": document_id, "workspace_id": WORKSPACE_ID, "filename": doc.corpus_id,
                "content_type": "text/plain", "sha256": hashlib.sha256(source).hexdigest(),
                "size_bytes": len(source), "status": DocumentStatus.READY,
                "chunk_count": len(doc_drafts),
            })
            for draft in doc_drafts:
                chunk_rows.append({
                    "workspace_id": WORKSPACE_ID, "document_id": document_id,
                    "ord": draft.order, "text": draft.text, "page": draft.page,
                    "section": draft.section, "meta": draft.metadata,
                    "embedding": next(vector_iter), "embedding_model": embedder.model_name,
                    "embedding_version": embedder.model_version,
                })
        with session_scope() as session:
            session.execute(insert(Document), document_rows)
            session.execute(insert(Chunk), chunk_rows)
        t3 = time.perf_counter()
        embed_s, insert_s = embed_s + t2 - t1, insert_s + t3 - t2
        total_chunks += len(chunk_rows)
        print(f"  indexed {start + len(group)}/{len(docs)} documents, {total_chunks} chunks, "
              f"{embed_s:.0f}s embedding, "
              f"{total_chunks / embed_s:.1f} chunks/s", file=sys.stderr, flush=True)
    return IndexStats(
        docs=len(docs), chunks=total_chunks, reused=False, model_load_s=model_load_s,
        embed_s=embed_s, insert_s=insert_s,
        total_s=time.perf_counter() - started,
    )


# Evaluation --------------------------------------------------------------------------------


def rank_documents(passages: Sequence[Passage], *, k: int) -> list[str]:
    """Corpus ids in order of their best-ranked chunk, at most k."""
    ranked: list[str] = []
    for passage in passages:
        if passage.filename not in ranked:
            ranked.append(passage.filename)
            if len(ranked) == k:
                break
    return ranked


def evaluate(
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    mode: str,
    encode_query: Callable[[str], np.ndarray],
) -> ModeResult:
    def search(query: str) -> list[Passage]:
        with session_scope() as session:
            return hybrid_search(session, workspace_id=WORKSPACE_ID, query=query,
                                 encode_query=encode_query, top_k=CHUNK_CANDIDATES,
                                 candidates=CHUNK_CANDIDATES, mode=mode)

    search(next(iter(queries.values())))  # warm caches and the query encoder
    scores, latencies = [], []
    for query_id, relevant in qrels.items():
        t0 = time.perf_counter()
        passages = search(queries[query_id])
        latencies.append((time.perf_counter() - t0) * 1000)
        ranked = rank_documents(passages, k=TOP_K_DOCS)
        scores.append(ndcg_at_k(ranked, relevant, k=TOP_K_DOCS))
    return ModeResult(ndcg=float(np.mean(scores)), latencies_ms=latencies)


# Dense faithfulness ------------------------------------------------------------------------


def mteb_document_text(doc: CorpusDoc) -> str:
    """The text MTEB embeds for a corpus document with a sentence-transformers model."""
    return f"{doc.title} {doc.text}".strip()


def stored_vectors(*, first_chunk_only: bool) -> tuple[list[str], np.ndarray]:
    """(corpus id per row, vectors) of the chunk vectors as indexed."""
    query = select(Document.filename, Chunk.embedding).join(
        Document, Document.id == Chunk.document_id
    ).where(Chunk.workspace_id == WORKSPACE_ID, Chunk.embedding.is_not(None))
    if first_chunk_only:
        query = query.where(Chunk.ord == 0)
    with session_scope() as session:
        rows = session.execute(query).all()
    return [r.filename for r in rows], np.stack([r.embedding for r in rows]).astype(np.float32)


def mteb_reference_vectors(
    docs: Sequence[CorpusDoc], *, embedder: Embedder, cache_dir: Path | None
) -> tuple[np.ndarray, float]:
    """One vector per abstract from MTEB's document text (the model truncates it at 256
    word-pieces, as in MTEB), and the seconds spent embedding (0 when cached in --keep)."""
    cache = None
    if cache_dir is not None:
        tag = embedder.model_version.replace("/", "_")
        cache = cache_dir / f"mteb-reference-{len(docs)}docs-{tag}.npy"
        if cache.exists():
            return np.load(cache), 0.0
    t0 = time.perf_counter()
    vectors = embedder.encode([mteb_document_text(d) for d in docs])
    seconds = time.perf_counter() - t0
    if cache is not None:
        np.save(cache, vectors)
    return vectors, seconds


def exact_dense_ndcg(
    query_vectors: dict[str, np.ndarray],
    qrels: dict[str, dict[str, int]],
    *,
    ids: Sequence[str],
    vectors: np.ndarray,
) -> float:
    """nDCG@10 of exact cosine search over `vectors` (rows labelled by corpus id, several rows
    per document allowed: the best one ranks the document)."""
    scores = []
    for query_id, relevant in qrels.items():
        similarities = vectors @ query_vectors[query_id]
        ranked: list[str] = []
        for row in np.argsort(-similarities, kind="stable"):
            if ids[row] not in ranked:
                ranked.append(ids[row])
                if len(ranked) == TOP_K_DOCS:
                    break
        scores.append(ndcg_at_k(ranked, relevant, k=TOP_K_DOCS))
    return float(np.mean(scores))


def dense_diagnostics(
    docs: Sequence[CorpusDoc],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    encode_query: Callable[[str], np.ndarray],
    embedder: Embedder,
    reference: bool,
    cache_dir: Path | None,
) -> dict[str, float]:
    """Exact-search nDCG@10 of the stored vectors (all chunks; first chunk only) and, with
    `reference`, of MTEB's own document text: the published score's setup."""
    query_vectors = {qid: encode_query(queries[qid]) for qid in qrels}
    out: dict[str, float] = {}
    for name, first_only in (("dense_exact", False), ("dense_first_chunk", True)):
        ids, vectors = stored_vectors(first_chunk_only=first_only)
        out[name] = exact_dense_ndcg(query_vectors, qrels, ids=ids, vectors=vectors)
    if reference:
        vectors, seconds = mteb_reference_vectors(docs, embedder=embedder, cache_dir=cache_dir)
        out["dense_mteb_reference"] = exact_dense_ndcg(
            query_vectors, qrels, ids=[d.corpus_id for d in docs], vectors=vectors)
        out["reference_embed_s"] = seconds
    return out


# Report ------------------------------------------------------------------------------------


def print_report(
    *,
    results: dict[str, ModeResult],
    stats: IndexStats,
    full_corpus: bool,
    queries: int,
    database: str,
    encoder_name: str,
    encode_p50_ms: float,
    diagnostics: dict[str, float],
) -> bool | None:
    print()
    print(f"SciFact test, {queries} queries, {stats.docs} documents, {stats.chunks} chunks, "
          f"{database}; query encoder: {encoder_name}")
    header = ("mode", "nDCG@10", "anchor", "diff", "p50 ms", "p95 ms")
    print(f"{header[0]:<10}" + "".join(f"{h:>9}" for h in header[1:]) + "  anchor source")
    for mode, result in results.items():
        anchor = ANCHORS[mode]
        cells = (result.ndcg, anchor.score, result.ndcg - anchor.score)
        print(f"{mode:<10}{cells[0]:>9.4f}{cells[1]:>9.4f}{cells[2]:>+9.4f}"
              f"{result.p50_ms:>9.1f}{result.p95_ms:>9.1f}  {anchor.source}")
    print(f"latency is per query, end to end (session, query encoding, search, passage load); "
          f"query encoding alone: p50 {encode_p50_ms:.1f} ms")
    print()
    if stats.reused:
        print(f"index: reused from an earlier --keep run ({stats.chunks} chunks)")
    else:
        print(f"index: {stats.docs} documents, {stats.chunks} chunks "
              f"({stats.chunks / max(stats.docs, 1):.2f} per document) in {stats.total_s:.1f}s: "
              f"chunking {stats.chunk_s:.1f}s, embedding {stats.embed_s:.1f}s "
              f"({stats.chunks_per_s:.1f} chunks/s), inserting {stats.insert_s:.1f}s; "
              f"model load {stats.model_load_s:.1f}s")
    load1, load5, _ = os.getloadavg()
    busy = " (busy: other work shared the CPUs, so timings are pessimistic)" if load5 > (
        os.cpu_count() or 1) else ""
    print(f"machine: {os.cpu_count()} CPUs, load average {load1:.1f} / {load5:.1f} (1 / 5 min) "
          f"at the end{busy}")
    print()
    print("dense, exact cosine search in numpy over the same query vectors:")
    rows = [
        ("dense_exact", "stored chunk vectors, best chunk per abstract"),
        ("dense_first_chunk", "stored vectors, first chunk of each abstract only"),
        ("dense_mteb_reference", "MTEB's text (title + ' ' + text), one vector each"),
    ]
    for key, label in rows:
        if key in diagnostics:
            value = diagnostics[key]
            print(f"  {label:<52}{value:>9.4f}{value - ANCHORS['dense'].score:>+9.4f}")
    if "dense_exact" in diagnostics:
        print(f"  hybrid_search dense minus exact search over its own vectors: "
              f"{results['dense'].ndcg - diagnostics['dense_exact']:+.4f} (index recall loss)")
    anchor = ANCHORS["dense"].score
    if not full_corpus:
        print("dense check: skipped (the published scores are for the full corpus)")
        return None
    if "dense_mteb_reference" not in diagnostics:
        print("dense check: skipped (--no-reference)")
        return None
    reference = diagnostics["dense_mteb_reference"]
    passed = abs(reference - anchor) <= DENSE_TOLERANCE
    print(f"dense check (embedding path faithful: MTEB's setup through Embedder within "
          f"{DENSE_TOLERANCE} of {anchor}): {'PASSED' if passed else 'FAILED'} "
          f"({reference:.4f}, {reference - anchor:+.4f})")
    chunked = results["dense"].ndcg
    within = abs(chunked - anchor) <= DENSE_TOLERANCE
    print(f"chunked dense (the product's index) vs the anchor: {chunked - anchor:+.4f} "
          f"({'within' if within else 'outside'} {DENSE_TOLERANCE}; chunks cover the whole "
          f"abstract where MTEB's one vector sees its first 256 word-pieces)")
    return passed


# Main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--limit-docs", type=int, default=None, metavar="N",
                        help="index only the first N abstracts (scores only queries whose "
                             "relevant abstracts are among them)")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="e.g. postgresql+psycopg://user:pw@host/db (default: SQLite in a "
                             "temporary data dir)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="use DIR as the data dir and keep it; a later run with the same "
                             "corpus reuses its index")
    parser.add_argument("--reindex", action="store_true",
                        help="rebuild the index even when a complete one exists")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the dense check's reference: embedding every abstract once "
                             "more as MTEB does (title + ' ' + text, one vector each)")
    parser.add_argument("--query-encoder", choices=("numpy", "torch"), default="numpy",
                        help="numpy: the API's NumpyQueryEncoder (default); torch: the workers' "
                             "Embedder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep:
        data_dir = args.keep.resolve()
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="sluice-scifact-"))
    configure(data_dir=data_dir, database_url=args.database_url)
    try:
        return run(args)
    finally:
        dispose_engine()
        if args.keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    corpus = read_corpus(SCIFACT / "corpus.jsonl")
    docs = corpus[: args.limit_docs] if args.limit_docs is not None else corpus
    full_corpus = len(docs) == len(corpus)
    queries = read_queries(SCIFACT / "queries_test.jsonl")
    qrels = read_qrels(SCIFACT / "qrels" / "test.tsv")
    if not full_corpus:
        indexed = {d.corpus_id for d in docs}
        qrels = {
            qid: {cid: rel for cid, rel in rel_docs.items() if cid in indexed}
            for qid, rel_docs in qrels.items()
            if any(cid in indexed for cid in rel_docs)
        }
    database = redact(settings.resolved_database_url)
    print(f"database: {database}", file=sys.stderr)

    engine = get_engine()
    upgrade(engine)

    embedder = Embedder(model_path=settings.embedding_model_path or default_model_path(),
                        batch_size=settings.embedding_batch_size,
                        threads=settings.embedding_threads)
    t0 = time.perf_counter()
    drafts = chunk_corpus(docs, max_words=settings.chunk_max_words)
    chunk_s = time.perf_counter() - t0
    chunks = sum(len(doc_drafts) for doc_drafts in drafts)
    if not args.reindex and existing_index(docs, drafts, model_version=embedder.model_version):
        stats = IndexStats(docs=len(docs), chunks=chunks, reused=True, chunk_s=chunk_s)
    else:
        reset_workspace()
        indexed = index_corpus(docs, drafts, embedder=embedder)
        stats = replace(indexed, chunk_s=chunk_s, total_s=indexed.total_s + chunk_s)

    if args.query_encoder == "numpy":
        numpy_encoder = NumpyQueryEncoder(settings.embedding_model_path or default_model_path())
        encode_query: Callable[[str], np.ndarray] = numpy_encoder.encode_one
        encoder_name = "NumpyQueryEncoder (API path)"
    else:
        encode_query = lambda query: embedder.encode([query])[0]  # noqa: E731
        encoder_name = "Embedder (worker path)"

    encode_ms: list[float] = []

    def timed_encode(query: str) -> np.ndarray:
        t0 = time.perf_counter()
        vector = encode_query(query)
        encode_ms.append((time.perf_counter() - t0) * 1000)
        return vector

    results = {mode: evaluate(queries, qrels, mode=mode, encode_query=timed_encode)
               for mode in MODES}
    diagnostics = dense_diagnostics(
        docs, queries, qrels, encode_query=encode_query, embedder=embedder,
        reference=not args.no_reference, cache_dir=args.keep.resolve() if args.keep else None)
    passed = print_report(results=results, stats=stats, full_corpus=full_corpus,
                          queries=len(qrels), database=engine.dialect.name,
                          encoder_name=encoder_name, encode_p50_ms=statistics.median(encode_ms),
                          diagnostics=diagnostics)
    summary: dict[str, Any] = {mode: round(result.ndcg, 5) for mode, result in results.items()}
    summary.update({
        "docs": stats.docs, "chunks": stats.chunks, "queries": len(qrels),
        "database": engine.dialect.name, "query_encoder": args.query_encoder,
        "index_reused": stats.reused,
        # null when the index was reused: nothing was timed
        **{key: None if stats.reused else round(value, 2) for key, value in (
            ("embed_chunks_per_s", stats.chunks_per_s), ("embed_s", stats.embed_s),
            ("insert_s", stats.insert_s), ("index_s", stats.total_s))},
        **{f"p50_ms_{mode}": round(result.p50_ms, 2) for mode, result in results.items()},
        "encode_p50_ms": round(statistics.median(encode_ms), 2),
        "load_avg_5m": round(os.getloadavg()[1], 2),
        **{key: round(value, 5) for key, value in diagnostics.items()},
        "dense_anchor": ANCHORS["dense"].score, "dense_check_passed": passed,
    })
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
