"""Large documents parsed in parts: a part job names its parent, a parent counts its parts.

A PDF over `pdf_part_pages` pages is parsed as one `ingest_part` job per page range while its
ingest job waits (state `waiting`). `jobs.parent_id` ties a part to its parent;
`parts_total`, `parts_done` and `parts_failed` on the parent are the fan-in counter that the
ledger moves in each part's final transaction, so the transaction whose increment completes
the set is the one that moves the parent on. `ix_jobs_parent_id` lists a parent's parts.

Plain `ADD COLUMN`s on both databases. `parent_id` has no foreign key: SQLite cannot add one
in place, and rebuilding `jobs` (batch mode) would, with foreign keys on, delete every job's
attempts and events through their `ON DELETE CASCADE` when the old table is dropped.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = ("parts_total", "parts_done", "parts_failed")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("parent_id", sa.String(36)))
    for name in COUNTERS:
        op.add_column("jobs", sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent_id", table_name="jobs")
    for name in (*reversed(COUNTERS), "parent_id"):
        op.drop_column("jobs", name)  # SQLite >= 3.35 drops a plain column in place
