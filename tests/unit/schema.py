"""The database's schema as it is now, for the migration tests."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from models import Base
from sluice.db import get_engine


def table_names() -> set[str]:
    return set(inspect(get_engine()).get_table_names())


def column_names(table: str) -> set[str]:
    return {c["name"] for c in inspect(get_engine()).get_columns(table)}


def index_names(table: str) -> set[str]:
    return {ix["name"] for ix in inspect(get_engine()).get_indexes(table)}


def schema_drift(*names: str) -> list[object]:
    """What autogenerate would change that mentions any of `names` (nothing, if the models and
    the migrations agree about them)."""
    with get_engine().connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                 Base.metadata)
    return [d for d in diffs if any(name in repr(d) for name in names)]
