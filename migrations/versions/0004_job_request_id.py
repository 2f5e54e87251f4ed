"""Index jobs by request id: the jobs an HTTP request created (and every log line of them,
which carries the same id) are found from the `X-Request-ID` a client or proxy saw.

The `request_id` column itself has been in `jobs` since 0001; until now nothing filled it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_request_id", "jobs", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_request_id", table_name="jobs")
