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
from models.keys import ApiKey, Role
from models.quotas import WorkspaceQuota

__all__ = [
    "ApiKey",
    "Base",
    "Chunk",
    "Document",
    "DocumentStatus",
    "Job",
    "JobAttempt",
    "JobEvent",
    "JobKind",
    "JobState",
    "Role",
    "Stage",
    "Workspace",
    "WorkspaceQuota",
]
