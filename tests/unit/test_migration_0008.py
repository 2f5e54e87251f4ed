"""Migration 0008 (held jobs: `jobs.held` and the lane index) goes up and down on SQLite and
PostgreSQL, keeps the jobs, and leaves the schema the models describe."""

from __future__ import annotations

from sqlalchemy import select, text

from models import Job, JobKind, Stage, ledger
from sluice import migrate
from sluice.db import dispose_engine, get_engine, session_scope
from tests.unit.schema import column_names, index_names, schema_drift

INDEX = "ix_jobs_workspace_lane"


def test_0008_up_and_down(any_db: dict[str, str]) -> None:
    from api.deps import ensure_workspace

    assert migrate.current_revision(get_engine()) == migrate.head_revision()  # 0008 or later
    assert "held" in column_names("jobs") and INDEX in index_names("jobs")
    assert schema_drift(INDEX, "'held'") == []

    migrate.downgrade(get_engine(), "0007")
    dispose_engine()
    assert "held" not in column_names("jobs") and INDEX not in index_names("jobs")
    with get_engine().begin() as conn:  # a job written by the code before 0008
        conn.execute(text("INSERT INTO workspaces (id, created_at) VALUES ('w', :now)"),
                     {"now": "2026-11-21 00:00:00"})
        conn.execute(text(
            "INSERT INTO jobs (id, workspace_id, kind, state, stage, attempt, attempts_total, "
            "progress, payload, cancel_requested, created_at, updated_at) VALUES "
            "('old', 'w', 'answer', 'queued', 'answer', 0, 0, 0, '{}', false, :now, :now)"),
            {"now": "2026-11-21 00:00:00"})

    migrate.upgrade(get_engine(), "0008")
    dispose_engine()
    assert "held" in column_names("jobs") and INDEX in index_names("jobs")
    assert schema_drift(INDEX, "'held'") == []
    with session_scope() as session:
        assert session.scalar(select(Job.held).where(Job.id == "old")) is False  # not held
        ensure_workspace(session, "w")
        held = ledger.create_job(session, workspace_id="w", kind=JobKind.ANSWER,
                                 stage=Stage.ANSWER, held=True).id
    with session_scope() as session:
        assert session.get_one(Job, held).held is True
