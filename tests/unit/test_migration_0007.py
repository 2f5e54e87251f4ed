"""Migration 0007 (API keys, workspace quotas, the unfinished-jobs index) goes up and down on
SQLite and PostgreSQL, and leaves the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from models import Base, Job, JobKind, Stage, ledger
from models.keys import Role, create_key, find_active_key
from models.quotas import set_overrides
from sluice import migrate
from sluice.db import dispose_engine, get_engine, session_scope

NEW_TABLES = {"api_keys", "workspace_quotas"}


def _tables() -> set[str]:
    return set(inspect(get_engine()).get_table_names())


def _job_indexes() -> set[str]:
    return {ix["name"] for ix in inspect(get_engine()).get_indexes("jobs")}


def _schema_drift() -> list[object]:
    """What autogenerate would change for the new tables and index (nothing, if the models
    and the migration agree)."""
    with get_engine().connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                 Base.metadata)
    touched = []
    for diff in diffs:
        flat = diff if isinstance(diff, tuple) else diff[0]
        text = repr(flat)
        if any(name in text for name in (*NEW_TABLES, "ix_jobs_workspace_state")):
            touched.append(diff)
    return touched


def test_0007_up_and_down(any_db: dict[str, str]) -> None:
    from api.deps import ensure_workspace

    assert migrate.current_revision(get_engine()) == migrate.head_revision()  # 0007 or later
    assert _tables() >= NEW_TABLES and "ix_jobs_workspace_state" in _job_indexes()
    assert _schema_drift() == []
    with session_scope() as session:
        ensure_workspace(session, "w")
        token = create_key(session, workspace_id="w", role=Role.READER).token
        set_overrides(session, workspace_id="w", values={"documents": 5})
        ledger.create_job(session, workspace_id="w", kind=JobKind.ANSWER, stage=Stage.ANSWER,
                          payload={"question": "kept?"})

    migrate.downgrade(get_engine(), "0006")
    dispose_engine()
    assert not NEW_TABLES & _tables() and "ix_jobs_workspace_state" not in _job_indexes()
    with session_scope() as session:  # the rest of the data is untouched
        assert session.scalar(select(func.count()).select_from(Job)) == 1

    migrate.upgrade(get_engine(), "0007")
    dispose_engine()
    assert _tables() >= NEW_TABLES and "ix_jobs_workspace_state" in _job_indexes()
    assert _schema_drift() == []
    with session_scope() as session:
        assert find_active_key(session, token) is None  # keys went with the downgrade
        ensure_workspace(session, "w")
        assert find_active_key(session, create_key(session, workspace_id="w",
                                                   role=Role.ADMIN).token) is not None
