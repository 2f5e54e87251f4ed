"""Workspaces, documents, chunks with their vector and full-text indexes, and the job ledger.

The vector and full-text indexes differ by dialect: on PostgreSQL a pgvector `vector(384)`
column with an HNSW index and a generated `tsvector` column with a GIN index; on SQLite a
sqlite-vec `vec0` table partitioned by workspace and an FTS5 table, both kept in step with
`chunks` by triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from models.types import EMBEDDING_DIM, Embedding, JSONType

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

SQLITE_INDEX_DDL = [
    f"""CREATE VIRTUAL TABLE chunk_vectors USING vec0(
        chunk_id INTEGER PRIMARY KEY,
        workspace_id TEXT PARTITION KEY,
        embedding FLOAT[{EMBEDDING_DIM}] distance_metric=cosine
    )""",
    """CREATE VIRTUAL TABLE chunk_fts USING fts5(
        text, content='chunks', content_rowid='id', tokenize='porter unicode61'
    )""",
    """CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
        INSERT INTO chunk_fts(rowid, text) VALUES (new.id, new.text);
        INSERT INTO chunk_vectors(chunk_id, workspace_id, embedding)
            SELECT new.id, new.workspace_id, new.embedding WHERE new.embedding IS NOT NULL;
    END""",
    """CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
        INSERT INTO chunk_fts(chunk_fts, rowid, text) VALUES ('delete', old.id, old.text);
        DELETE FROM chunk_vectors WHERE chunk_id = old.id;
    END""",
    """CREATE TRIGGER chunks_au_text AFTER UPDATE OF text ON chunks BEGIN
        INSERT INTO chunk_fts(chunk_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO chunk_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER chunks_au_embedding AFTER UPDATE OF embedding ON chunks BEGIN
        DELETE FROM chunk_vectors WHERE chunk_id = old.id;
        INSERT INTO chunk_vectors(chunk_id, workspace_id, embedding)
            SELECT new.id, new.workspace_id, new.embedding WHERE new.embedding IS NOT NULL;
    END""",
]

POSTGRES_INDEX_DDL = [
    "ALTER TABLE chunks ADD COLUMN tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    "CREATE INDEX ix_chunks_tsv ON chunks USING gin (tsv)",
    "CREATE INDEX ix_chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)",
]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "documents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(255)),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("page_count", sa.Integer),
        sa.Column("chunk_count", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_documents_workspace_id", "documents", ["workspace_id"])
    op.create_index("ix_documents_workspace_sha256", "documents", ["workspace_id", "sha256"])

    op.create_table(
        "chunks",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column(
            "document_id",
            sa.String(36),
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("ord", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("page", sa.Integer),
        sa.Column("section", sa.Text),
        sa.Column("meta", JSONType, nullable=False),
        sa.Column("embedding_model", sa.String(128)),
        sa.Column("embedding_version", sa.String(64)),
        sa.Column("embedding", Embedding(EMBEDDING_DIM)),
    )
    op.create_index("ix_chunks_workspace_id", "chunks", ["workspace_id"])
    op.create_index("ix_chunks_document_ord", "chunks", ["document_id", "ord"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column(
            "document_id", sa.String(36), sa.ForeignKey("documents.id", ondelete="SET NULL")
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("attempts_total", sa.Integer, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("result", JSONType),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("worker", sa.String(255)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("published_at", TS),
        sa.Column("started_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("retry_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("replayed_at", TS),
    )
    op.create_index("ix_jobs_document_id", "jobs", ["document_id"])
    op.create_index("ix_jobs_state_updated", "jobs", ["state", "updated_at"])
    op.create_index("ix_jobs_workspace_created", "jobs", ["workspace_id", "created_at"])

    op.create_table(
        "job_attempts",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("outcome", sa.String(16)),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", sa.Text),
    )
    op.create_index("ix_job_attempts_job_id", "job_attempts", ["job_id"])

    for ddl in POSTGRES_INDEX_DDL if dialect == "postgresql" else SQLITE_INDEX_DDL:
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("chunks_ai", "chunks_ad", "chunks_au_text", "chunks_au_embedding"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS chunk_fts")
        op.execute("DROP TABLE IF EXISTS chunk_vectors")
    for table in ("job_attempts", "jobs", "chunks", "documents", "workspaces"):
        op.drop_table(table)
