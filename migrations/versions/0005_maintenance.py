"""Maintenance: the periodic tasks' lock table, and an index for the re-embed sweep.

`maintenance_locks` holds one row per periodic task: its current lease (owner, expiry),
taken by compare-and-set so that two beats, or a duplicate message, never run a task twice at
once; and how its last run ended. `ix_chunks_embedding_version` lets the re-embed sweep find
the chunks of another model version without reading every vector.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from models.types import JSONType

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "maintenance_locks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255)),
        sa.Column("expires_at", TS),
        sa.Column("acquired_at", TS),
        sa.Column("last_finished_at", TS),
        sa.Column("last_result", JSONType),
    )
    op.create_index("ix_chunks_embedding_version", "chunks", ["embedding_version"])


def downgrade() -> None:
    op.drop_index("ix_chunks_embedding_version", table_name="chunks")
    op.drop_table("maintenance_locks")
