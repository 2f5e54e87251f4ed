"""The tables: workspaces, documents, chunks, and the job ledger (jobs + attempts)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.types import Embedding, JSONType

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants a bigint.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSONType}


class DocumentStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class JobKind(StrEnum):
    INGEST = "ingest"
    INGEST_PART = "ingest_part"  # one page range of a large PDF, parsed for its parent ingest
    ANSWER = "answer"


class Stage(StrEnum):
    PARSE = "parse"
    EMBED = "embed"
    ANSWER = "answer"


class JobState(StrEnum):
    QUEUED = "queued"
    WAITING = "waiting"  # split into parts: neither published nor run until they are done
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED})


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (Index("ix_documents_workspace_sha256", "workspace_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=DocumentStatus.PENDING)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    page_count: Mapped[int | None] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_document_ord", "document_id", "ord"),
        # The re-embed sweep finds chunks of another model version through this index.
        Index("ix_chunks_embedding_version", "embedding_version"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), index=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    ord: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer)
    section: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    embedding_model: Mapped[str | None] = mapped_column(String(128))
    embedding_version: Mapped[str | None] = mapped_column(String(64))
    embedding: Mapped[np.ndarray | None] = mapped_column(Embedding())


class Job(Base):
    """The ledger row of one unit of work. Only `models.ledger` changes `state`."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_updated", "state", "updated_at"),
        Index("ix_jobs_workspace_created", "workspace_id", "created_at"),
        # A workspace's unfinished jobs, counted for its quota on every upload and question.
        Index("ix_jobs_workspace_state", "workspace_id", "state"),
        # Fairness (models/fairness.py): a workspace's jobs in flight per lane, counted on
        # every upload and every job's end, and its oldest held jobs, in index order.
        Index("ix_jobs_workspace_lane", "workspace_id", "state", "held", "kind", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"))
    kind: Mapped[str] = mapped_column(String(16))
    document_id: Mapped[str | None] = mapped_column(
        ForeignKey("documents.id", ondelete="SET NULL"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    stage: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts at the current stage
    attempts_total: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(default=0.0)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Queued without a message because its workspace was at its in-flight cap (fairness);
    # cleared when it is dispatched. A delivery never starts a held job.
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    request_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # A part (models.ledger's fan-in): the job it was split from; a parent counts its parts.
    # No foreign key: SQLite cannot add one to a table in place (see migration 0006), and a
    # parent is only deleted once final, after its parts were; retention purges orphans.
    parent_id: Mapped[str | None] = mapped_column(String(36), index=True)
    parts_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    parts_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    parts_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    retry_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    replayed_at: Mapped[datetime | None]


class JobAttempt(Base):
    """One try at one stage of a job, kept forever for the dead-letter view."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"))
    stage: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)


class IdempotencyRecord(Base):
    """The stored response of a POST made with an `Idempotency-Key` header."""

    __tablename__ = "idempotency_keys"

    workspace_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """One change of a job as clients see it (state, stage, progress, error), appended by the
    ledger in the same transaction as the change: the job event streams read these rows, so
    they work across processes and never miss a transition."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job", "job_id", "id"),
        Index("ix_job_events_workspace", "workspace_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    workspace_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MaintenanceLock(Base):
    """One row per periodic task: who holds it now (a lease taken by compare-and-set, so a
    second beat or a duplicate message cannot run the task twice at once) and how its last
    run ended."""

    __tablename__ = "maintenance_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    expires_at: Mapped[datetime | None]
    acquired_at: Mapped[datetime | None]
    last_finished_at: Mapped[datetime | None]
    last_result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
