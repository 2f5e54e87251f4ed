"""Fairness between workspaces: jobs held back while their workspace is at its in-flight cap.

`jobs.held`: queued without a message because its workspace had as many jobs in flight as its
cap allows (`models/fairness.py`); cleared when the job is dispatched. `ix_jobs_workspace_lane`
counts a workspace's jobs in flight per lane (workspace, state, held, kind) and finds its
oldest held jobs in index order (… created_at), on every upload and every job's end.

A plain `ADD COLUMN` with a default on both databases: every existing job is not held.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX_COLUMNS = ["workspace_id", "state", "held", "kind", "created_at"]


def upgrade() -> None:
    op.add_column("jobs", sa.Column("held", sa.Boolean, nullable=False,
                                    server_default=sa.false()))
    op.create_index("ix_jobs_workspace_lane", "jobs", INDEX_COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_jobs_workspace_lane", table_name="jobs")
    op.drop_column("jobs", "held")  # SQLite >= 3.35 drops a plain column in place
