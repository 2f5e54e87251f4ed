"""API keys and per-workspace quotas.

`api_keys`: one row per key (its public id, workspace, role, the SHA-256 of the key, optional
rate limit, created / last used / revoked times); the key itself is never stored.
`workspace_quotas`: per-workspace overrides of the settings' quota defaults (NULL keeps the
default). `ix_jobs_workspace_state` counts a workspace's unfinished jobs for its quota.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255)),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("rate_limit", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("revoked_at", TS),
    )
    op.create_index("ix_api_keys_workspace_id", "api_keys", ["workspace_id"])
    op.create_table(
        "workspace_quotas",
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"),
                  primary_key=True),
        sa.Column("documents", sa.Integer),
        sa.Column("stored_bytes", sa.BigInteger),
        sa.Column("queued_jobs", sa.Integer),
        sa.Column("answers_per_minute", sa.Integer),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_jobs_workspace_state", "jobs", ["workspace_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_workspace_state", table_name="jobs")
    op.drop_table("workspace_quotas")
    op.drop_index("ix_api_keys_workspace_id", table_name="api_keys")
    op.drop_table("api_keys")
