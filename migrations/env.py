"""Alembic environment: runs against the connection handed over by `sluice.migrate`, or an
engine built from settings when invoked as `alembic upgrade head`."""

from __future__ import annotations

from alembic import context

from models.entities import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from sluice.db import get_engine

    with get_engine().connect() as conn:
        _run(conn)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
