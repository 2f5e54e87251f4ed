"""Per-workspace quotas: documents, stored bytes, unfinished jobs, answers per minute.

The limits are the settings' defaults, each overridable per workspace by a row in
`workspace_quotas` (a NULL column keeps the default). Checks run inside the transaction that
would add the rows, after `lock_workspace`, so two concurrent requests cannot both pass a
check that only one of them fits (PostgreSQL: a row lock on the workspace; SQLite: writers are
serialised already). Answers per minute is a moving window (`api/ratelimit.py`), not a count
of rows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.entities import Base, Document, Job, JobState, Workspace, utcnow

UNFINISHED_STATES = (JobState.QUEUED, JobState.WAITING, JobState.RUNNING, JobState.RETRYING)


class WorkspaceQuota(Base):
    __tablename__ = "workspace_quotas"

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    documents: Mapped[int | None] = mapped_column(Integer)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    queued_jobs: Mapped[int | None] = mapped_column(Integer)
    answers_per_minute: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


@dataclass(frozen=True, slots=True)
class Quota:
    """Effective limits of a workspace; None is unlimited."""

    documents: int | None = None
    stored_bytes: int | None = None
    queued_jobs: int | None = None
    answers_per_minute: int | None = None


QUOTA_FIELDS = tuple(f.name for f in fields(Quota))


@dataclass(frozen=True, slots=True)
class Usage:
    documents: int
    stored_bytes: int
    queued_jobs: int


class QuotaExceeded(Exception):
    """A request that would take a workspace over one of its quotas; nothing was added."""

    def __init__(self, *, status: int, code: str, message: str,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def effective_quota(session: Session, *, workspace_id: str, defaults: Quota) -> Quota:
    row = session.get(WorkspaceQuota, workspace_id)
    if row is None:
        return defaults
    return Quota(**{name: getattr(row, name) if getattr(row, name) is not None
                    else getattr(defaults, name) for name in QUOTA_FIELDS})


def overrides(session: Session, *, workspace_id: str) -> dict[str, int | None]:
    row = session.get(WorkspaceQuota, workspace_id)
    return {name: getattr(row, name) if row is not None else None for name in QUOTA_FIELDS}


def set_overrides(session: Session, *, workspace_id: str, values: dict[str, int | None]) -> None:
    """Set the named overrides (None: back to the default); other columns are kept."""
    unknown = set(values) - set(QUOTA_FIELDS)
    if unknown:
        raise ValueError(f"unknown quota {sorted(unknown)}")
    row = session.get(WorkspaceQuota, workspace_id)
    if row is None:
        row = WorkspaceQuota(workspace_id=workspace_id)
        session.add(row)
    for name, value in values.items():
        setattr(row, name, value)
    session.flush()


def usage(session: Session, *, workspace_id: str) -> Usage:
    documents, stored = session.execute(
        select(func.count(), func.coalesce(func.sum(Document.size_bytes), 0))
        .where(Document.workspace_id == workspace_id)
    ).one()
    return Usage(documents=int(documents), stored_bytes=int(stored),
                 queued_jobs=unfinished_jobs(session, workspace_id=workspace_id))


def unfinished_jobs(session: Session, *, workspace_id: str) -> int:
    """Jobs the workspace's requests created that have not ended (parts are the work of
    their parent, which is counted)."""
    return int(session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.workspace_id == workspace_id, Job.state.in_(UNFINISHED_STATES),
               Job.parent_id.is_(None))
    ) or 0)


def lock_workspace(session: Session, *, workspace_id: str) -> None:
    """Serialise quota checks of one workspace until the transaction ends (the workspace row
    must exist: `api.deps.ensure_workspace`)."""
    session.execute(select(Workspace.id).where(Workspace.id == workspace_id).with_for_update())


def check_document(session: Session, *, workspace_id: str, quota: Quota, size_bytes: int,
                   retry_after_s: int = 30) -> None:
    """Raise QuotaExceeded unless one more document of `size_bytes`, and its job, fit."""
    used = usage(session, workspace_id=workspace_id)
    if quota.documents is not None and used.documents + 1 > quota.documents:
        raise QuotaExceeded(status=429, code="document_quota_exceeded",
                            message=f"the workspace holds {used.documents} documents, its "
                            f"quota is {quota.documents}: delete some first")
    if quota.stored_bytes is not None and used.stored_bytes + size_bytes > quota.stored_bytes:
        raise QuotaExceeded(status=413, code="storage_quota_exceeded",
                            message=f"{size_bytes} more bytes would take the workspace over "
                            f"its storage quota of {quota.stored_bytes} bytes "
                            f"({used.stored_bytes} stored)")
    check_job(session, workspace_id=workspace_id, quota=quota, unfinished=used.queued_jobs,
              retry_after_s=retry_after_s)


def check_job(session: Session, *, workspace_id: str, quota: Quota,
              unfinished: int | None = None, retry_after_s: int = 30) -> None:
    """Raise QuotaExceeded unless one more unfinished job fits."""
    if quota.queued_jobs is None:
        return
    if unfinished is None:
        unfinished = unfinished_jobs(session, workspace_id=workspace_id)
    if unfinished + 1 > quota.queued_jobs:
        raise QuotaExceeded(status=429, code="queued_jobs_quota_exceeded",
                            message=f"the workspace has {unfinished} unfinished jobs, its "
                            f"quota is {quota.queued_jobs}: retry when some have finished",
                            retry_after_s=retry_after_s)
