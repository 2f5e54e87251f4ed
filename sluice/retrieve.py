"""Hybrid retrieval: dense (vector index) + full-text, fused by reciprocal rank fusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Chunk, Document
from models.search import dense_search, fulltext_search
from pipelines.retrieval import fts_query_terms, reciprocal_rank_fusion
from pipelines.types import Passage

EncodeQuery = Callable[[str], np.ndarray]


def hybrid_search(
    session: Session,
    *,
    workspace_id: str,
    query: str,
    encode_query: EncodeQuery,
    top_k: int,
    candidates: int = 50,
    mode: str = "hybrid",
    embedding_version: str | None = None,
) -> list[Passage]:
    """The `top_k` passages of `workspace_id` best matching `query`.

    `mode` is "hybrid" (default), "dense" or "fulltext". `embedding_version` is the model
    version of `encode_query`'s vectors: dense search skips chunks embedded by another model
    (during a model switch); None compares with every vector."""
    limit = max(candidates, top_k)
    rankings: list[Sequence[tuple[int, float]]] = []
    if mode in ("hybrid", "dense"):
        rankings.append(dense_search(session, workspace_id=workspace_id,
                                     vector=encode_query(query), limit=limit,
                                     version=embedding_version))
    if mode in ("hybrid", "fulltext"):
        rankings.append(fulltext_search(session, workspace_id=workspace_id,
                                        terms=fts_query_terms(query), limit=limit))
    if mode == "hybrid":
        fused = reciprocal_rank_fusion(rankings, limit=top_k)
    else:
        fused = list(rankings[0][:top_k])
    return load_passages(session, workspace_id=workspace_id, ranked=fused)


def load_passages(
    session: Session, *, workspace_id: str, ranked: Sequence[tuple[int, float]]
) -> list[Passage]:
    if not ranked:
        return []
    ids = [chunk_id for chunk_id, _ in ranked]
    rows = session.execute(
        select(Chunk.id, Chunk.document_id, Chunk.page, Chunk.text, Document.filename)
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.id.in_(ids), Chunk.workspace_id == workspace_id)
    ).all()
    by_id = {r.id: r for r in rows}
    return [
        Passage(chunk_id=cid, document_id=by_id[cid].document_id, filename=by_id[cid].filename,
                page=by_id[cid].page, text=by_id[cid].text, score=score)
        for cid, score in ranked
        if cid in by_id
    ]
