"""Pure ranking helpers: rank fusion, safe full-text query terms, and nDCG for benchmarks.

Nothing here touches a database; the storage adapters build their SQL from these values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

RRF_K = 60
"""The constant of Cormack et al. (2009); it damps the weight of the very top ranks."""

MAX_QUERY_TERMS = 32
"""Bound on the terms taken from one question, so a pasted essay cannot make a huge query."""

# Letters and digits only: underscores, punctuation and every FTS5 / tsquery operator
# character (" * ^ : ( ) & | ! < - +) fall outside, so a term can never carry syntax.
_TERM_RE = re.compile(r"[^\W_]+")

ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are aren as at be because been before
    being below between both but by can cannot could couldn did didn do does doesn doing don
    down during each few for from further had hadn has hasn have haven having he her here hers
    herself him himself his how i if in into is isn it its itself just let ll me more most
    mustn my myself no nor not now of off on once only or other ought our ours ourselves out
    over own re s same shan she should shouldn so some such t than that the their theirs them
    themselves then there these they this those through to too under until up ve very was
    wasn we were weren what when where which while who whom why will with won would wouldn
    you your yours yourself yourselves d m o y
    """.split()
)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[tuple[K, float]]],
    *,
    k: int = RRF_K,
    weights: Sequence[float] | None = None,
    limit: int | None = None,
) -> list[tuple[K, float]]:
    """Fuse ranked lists: ``score(d) = sum_i w_i / (k + rank_i(d))``, ranks counted from 1.

    Each ranking is ``(key, score)`` pairs ordered best first; only the position is used, the
    scores are ignored (they are not comparable across retrievers, which is the point of RRF).
    A key repeated within one ranking counts at its best position. Ties in the fused score keep
    the order in which keys were first seen (ranking by ranking), so the result is deterministic.
    """
    if k < 0:
        raise ValueError("k must be non-negative")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError("weights must have one entry per ranking")
    fused: dict[K, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        seen: set[K] = set()
        for rank, (key, _score) in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    ordered = sorted(fused.items(), key=lambda item: -item[1])  # stable: first-seen wins ties
    return ordered if limit is None else ordered[:limit]


def fts_query_terms(query: str, *, max_terms: int = MAX_QUERY_TERMS) -> list[str]:
    """Turn a user's question into lower-case word terms that are safe in any FTS syntax.

    Only runs of letters and digits survive, so quotes, ``*``, ``NEAR(``, ``;``, ``--`` and the
    like are gone before a query is built. English stopwords and single letters are dropped,
    duplicates removed (first occurrence kept), and at most ``max_terms`` returned. The result
    may be empty: callers must then skip the full-text search rather than send an empty MATCH.
    """
    terms: list[str] = []
    seen: set[str] = set()
    for match in _TERM_RE.finditer(query.lower()):
        term = match.group()
        if term in ENGLISH_STOPWORDS or term in seen:
            continue
        if len(term) == 1 and not term.isdigit():
            continue
        seen.add(term)
        terms.append(term)
        if len(terms) >= max_terms:
            break
    return terms


def _safe_terms(terms: Sequence[str]) -> list[str]:
    """Re-tokenise terms defensively, so a term that bypassed :func:`fts_query_terms` is safe."""
    return [piece for term in terms for piece in _TERM_RE.findall(term.lower())]


def to_fts5_match(terms: Sequence[str]) -> str:
    """An SQLite FTS5 ``MATCH`` expression: any of the terms, each a quoted string.

    Returns ``""`` when there is no term (an empty MATCH is a syntax error: skip the search).
    """
    return " OR ".join(f'"{term}"' for term in _safe_terms(terms))


def to_tsquery_or(terms: Sequence[str]) -> str:
    """A PostgreSQL ``to_tsquery('english', ...)`` text: any of the terms, joined with ``|``.

    Returns ``""`` when there is no term (skip the search, as with :func:`to_fts5_match`).
    """
    return " | ".join(f"'{term}'" for term in _safe_terms(terms))


def ndcg_at_k(
    ranked_ids: Sequence[Hashable],
    relevant: Mapping[Hashable, int],
    k: int = 10,
) -> float:
    """nDCG@k as BEIR computes it through pytrec_eval (trec_eval's ``ndcg_cut``).

    Gain is the graded relevance itself (not ``2**rel - 1``), discounted by ``log2(rank + 1)``;
    the ideal DCG ranks all judged-relevant ids (relevance > 0) by gain, cut at k. A query
    with no relevant id scores 0.0. An id repeated in ``ranked_ids`` counts once.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    ideal_gains = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal_gains, start=1))
    if ideal == 0.0:
        return 0.0
    dcg = 0.0
    seen: set[Hashable] = set()
    rank = 0
    for doc_id in ranked_ids:
        if doc_id in seen:
            continue
        seen.add(doc_id)
        rank += 1
        if rank > k:
            break
        gain = relevant.get(doc_id, 0)
        if gain > 0:
            dcg += gain / math.log2(rank + 1)
    return dcg / ideal
