"""Rank fusion, full-text query terms and nDCG, checked against hand-computed numbers."""

from __future__ import annotations

import re
import sqlite3

import pytest

from pipelines.retrieval import (
    fts_query_terms,
    ndcg_at_k,
    reciprocal_rank_fusion,
    to_fts5_match,
    to_tsquery_or,
)

HOSTILE_QUERIES = [
    '"a" OR b* NEAR(',
    "'; DROP TABLE chunks; --",
    'NEAR("x" "y", 2) AND NOT z^ OR col:term',
    "foo & bar | !baz <-> qux:* (",
    '"""',
    "))))((((",
    "\\' \\\" \x00 \u202e",
    "-",
    "",
]


def test_rrf_equal_weights_exact_scores() -> None:
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    lexical = [("b", 12.0), ("c", 7.5), ("d", 1.0)]
    fused = reciprocal_rank_fusion([dense, lexical])
    assert [key for key, _ in fused] == ["b", "c", "a", "d"]
    scores = dict(fused)
    assert scores["b"] == pytest.approx(0.03252247488101534, abs=1e-15)  # 1/62 + 1/61
    assert scores["c"] == pytest.approx(0.03200204813108039, abs=1e-15)  # 1/63 + 1/62
    assert scores["a"] == pytest.approx(0.01639344262295082, abs=1e-15)  # 1/61
    assert scores["d"] == pytest.approx(0.015873015873015872, abs=1e-15)  # 1/63


def test_rrf_weights_k_and_limit() -> None:
    dense = [("a", 0.9), ("b", 0.8)]
    lexical = [("b", 3.0), ("a", 2.0)]
    fused = reciprocal_rank_fusion([dense, lexical], k=0, weights=[2.0, 1.0], limit=1)
    # a: 2/1 + 1/2 = 2.5 ; b: 2/2 + 1/1 = 2.0
    assert fused == [("a", 2.5)]


def test_rrf_ties_keep_first_seen_order_and_duplicates_count_once() -> None:
    fused = reciprocal_rank_fusion([[(1, 0.0), (2, 0.0), (1, 0.0)], [(2, 0.0), (1, 0.0)]], k=1)
    assert fused == [(1, pytest.approx(1 / 2 + 1 / 3)), (2, pytest.approx(1 / 3 + 1 / 2))]
    assert reciprocal_rank_fusion([]) == []


def test_rrf_rejects_mismatched_weights() -> None:
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([[("a", 1.0)]], weights=[1.0, 2.0])


def test_fts_terms_drop_stopwords_punctuation_and_duplicates() -> None:
    assert fts_query_terms("What is the effect of BRCA1 on breast-cancer risk? Risk!") == [
        "effect",
        "brca1",
        "breast",
        "cancer",
        "risk",
    ]
    assert fts_query_terms("Apple's Q3 2023 net_sales") == ["apple", "q3", "2023", "net", "sales"]
    assert fts_query_terms("the of and a") == []
    assert len(fts_query_terms(" ".join(f"w{i}" for i in range(100)))) == 32


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries_yield_plain_terms(query: str) -> None:
    for term in fts_query_terms(query):
        assert re.fullmatch(r"[^\W_]+", term)
    assert re.fullmatch(r'("[^\W_]+"( OR "[^\W_]+")*)?', to_fts5_match(fts_query_terms(query)))
    assert re.fullmatch(r"('[^\W_]+'( \| '[^\W_]+')*)?", to_tsquery_or(fts_query_terms(query)))


def test_hostile_examples_exact() -> None:
    assert fts_query_terms('"a" OR b* NEAR(') == ["near"]
    drop = to_fts5_match(fts_query_terms("'; DROP TABLE chunks; --"))
    assert drop == '"drop" OR "table" OR "chunks"'
    assert to_tsquery_or(["drop", "table"]) == "'drop' | 'table'"
    # Terms that did not come from fts_query_terms are re-tokenised, never passed through.
    assert to_fts5_match(['x" OR y*', "a_b"]) == '"x" OR "or" OR "y" OR "a" OR "b"'
    assert to_tsquery_or(["it's", "c&d"]) == "'it' | 's' | 'c' | 'd'"
    assert to_fts5_match([]) == "" and to_tsquery_or([]) == ""


@pytest.mark.parametrize("query", HOSTILE_QUERIES + ["breast cancer risk", "Roberts Norwich goals"])
def test_fts5_match_runs_in_real_sqlite(query: str) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE chunks USING fts5(body)")
    db.executemany(
        "INSERT INTO chunks(body) VALUES (?)",
        [("Iwan Roberts scored goals for Norwich City",), ("Breast cancer risk and BRCA1",)],
    )
    match = to_fts5_match(fts_query_terms(query))
    if not match:
        return  # nothing to search for: callers skip the full-text leg
    rows = db.execute(
        "SELECT rowid FROM chunks WHERE chunks MATCH ? ORDER BY bm25(chunks)", (match,)
    ).fetchall()
    assert isinstance(rows, list)
    assert db.execute("SELECT count(*) FROM chunks").fetchone() == (2,)


def test_fts5_match_finds_the_right_row() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE chunks USING fts5(body)")
    db.executemany(
        "INSERT INTO chunks(body) VALUES (?)",
        [("Iwan Roberts scored goals for Norwich City",), ("Breast cancer risk and BRCA1",)],
    )
    match = to_fts5_match(fts_query_terms("How many goals did Roberts score?"))
    rows = db.execute("SELECT rowid FROM chunks WHERE chunks MATCH ?", (match,)).fetchall()
    assert rows == [(1,)]


def test_ndcg_graded_gains_exact() -> None:
    relevant = {"d1": 1, "d3": 2, "d5": 1, "d9": 0}
    # DCG = 1/log2(2) + 2/log2(4) = 2; IDCG = 2 + 1/log2(3) + 1/log2(4) = 3.1309297535714578
    assert ndcg_at_k(["d1", "d2", "d3", "d4"], relevant) == pytest.approx(
        0.6387878864795979, abs=1e-12
    )
    # k=1: gain 1 against an ideal of 2.
    assert ndcg_at_k(["d1", "d3"], relevant, k=1) == pytest.approx(0.5)
    assert ndcg_at_k(["d3", "d1", "d5"], relevant) == pytest.approx(1.0)


def test_ndcg_edge_cases() -> None:
    assert ndcg_at_k(["x", "y"], {}) == 0.0
    assert ndcg_at_k([], {"a": 1}) == 0.0
    assert ndcg_at_k(["b", "a"], {"a": 1}, k=1) == 0.0
    # A repeated id counts once: the second "b" does not push "a" out of the top 2.
    assert ndcg_at_k(["b", "b", "a"], {"a": 1}, k=2) == pytest.approx(1 / 1.584962500721156)
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], {"a": 1}, k=0)
