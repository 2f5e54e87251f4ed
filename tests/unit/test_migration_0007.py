"""Migration 0007 (API keys, workspace quotas, the unfinished-jobs index) goes up and down on
SQLite and PostgreSQL, and leaves the schema the models describe."""

from __future__ import annotations

from sqlalchemy import func, select

from models import Job, JobKind, Stage, ledger
from models.keys import Role, create_key, find_active_key
from models.quotas import set_overrides
from sluice import migrate
from sluice.db import dispose_engine, get_engine, session_scope
from tests.unit.schema import index_names, schema_drift, table_names

NEW_TABLES = {"api_keys", "workspace_quotas"}


def test_0007_up_and_down(any_db: dict[str, str]) -> None:
    from api.deps import ensure_workspace

    assert migrate.current_revision(get_engine()) == migrate.head_revision()  # 0007 or later
    assert table_names() >= NEW_TABLES and "ix_jobs_workspace_state" in index_names("jobs")
    assert schema_drift(*NEW_TABLES, "ix_jobs_workspace_state") == []
    with session_scope() as session:
        ensure_workspace(session, "w")
        token = create_key(session, workspace_id="w", role=Role.READER).token
        set_overrides(session, workspace_id="w", values={"documents": 5})
        ledger.create_job(session, workspace_id="w", kind=JobKind.ANSWER, stage=Stage.ANSWER,
                          payload={"question": "kept?"})

    migrate.downgrade(get_engine(), "0006")
    dispose_engine()
    assert not NEW_TABLES & table_names() and "ix_jobs_workspace_state" not in index_names("jobs")
    with session_scope() as session:  # the rest of the data is untouched
        assert session.scalar(select(func.count()).select_from(Job)) == 1

    migrate.upgrade(get_engine(), "0007")
    dispose_engine()
    assert table_names() >= NEW_TABLES and "ix_jobs_workspace_state" in index_names("jobs")
    assert schema_drift(*NEW_TABLES, "ix_jobs_workspace_state") == []
    with session_scope() as session:
        assert find_active_key(session, token) is None  # keys went with the downgrade
        ensure_workspace(session, "w")
        assert find_active_key(session, create_key(session, workspace_id="w",
                                                   role=Role.ADMIN).token) is not None
