"""Migration 0004 (index on jobs.request_id) goes up and down on SQLite and PostgreSQL; a
schema behind the code is not ready."""

from __future__ import annotations

from sluice import migrate, status
from sluice.db import dispose_engine, get_engine
from tests.unit.schema import index_names


def test_0004_up_and_down(any_db: dict[str, str]) -> None:
    assert migrate.current_revision(get_engine()) == migrate.head_revision()
    assert "ix_jobs_request_id" in index_names("jobs")
    migrate.downgrade(get_engine(), "0003")
    dispose_engine()
    assert "ix_jobs_request_id" not in index_names("jobs")
    behind = status.check_database()  # readiness refuses a schema behind the code
    assert not behind.ok and behind.revision == "0003" and "sluice migrate" in (behind.error or "")
    migrate.upgrade(get_engine(), "0004")
    dispose_engine()
    assert "ix_jobs_request_id" in index_names("jobs")
