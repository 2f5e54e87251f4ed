"""SQLite full-text search is driven by the FTS5 index, never by a scan of the workspace's
chunks with the MATCH run once per chunk (which took 10 s a query at 11k chunks)."""

from __future__ import annotations

from sqlalchemy import text

from models.search import SQLITE_FULLTEXT
from sluice.db import read_scope


def test_fulltext_plan_starts_from_the_fts_index(sluice_env: dict[str, str]) -> None:
    with read_scope() as session:
        plan = session.execute(text("EXPLAIN QUERY PLAN " + SQLITE_FULLTEXT),
                               {"match": '"word"', "ws": "default", "k": 10}).all()
    steps = [row[3] for row in plan]
    assert steps[0].startswith("SCAN f VIRTUAL TABLE"), steps
    assert any(step.startswith("SEARCH c USING INTEGER PRIMARY KEY") for step in steps), steps
