"""SQLAlchemy models and the job ledger. Every row belongs to a workspace."""

from models.entities import (
    Base,
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobAttempt,
    JobEvent,
    JobKind,
    JobState,
    Stage,
    Workspace,
)

__all__ = [
    "Base",
    "Chunk",
    "Document",
    "DocumentStatus",
    "Job",
    "JobAttempt",
    "JobEvent",
    "JobKind",
    "JobState",
    "Stage",
    "Workspace",
]
