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

from sqlalchemy import BigInteger, ForeignKey, Integer, bindparam, func, select
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
    return measure(session, workspace_id=workspace_id, defaults=Quota())[1]


def measure(session: Session, *, workspace_id: str, defaults: Quota,
            lock: bool = False) -> tuple[Quota, Usage]:
    """The workspace's effective quota and its usage, in one statement (an upload runs it
    under the workspace's lock, where every round trip counts). `lock`: lock the workspace
    first, as `lock_workspace` does; its row must exist then (`LookupError` otherwise:
    `api.deps.ensure_workspace` first). A workspace with no row yet has nothing: the defaults
    and no usage.

    The lock is a statement of its own: PostgreSQL (read committed) gives each statement the
    snapshot it started with, so counts read in the statement that waited for the lock would
    miss what the transaction that held it committed."""
    if lock and session.execute(_LOCK, {"workspace_id": workspace_id}).first() is None:
        raise LookupError(f"workspace {workspace_id!r} does not exist")
    row = session.execute(_MEASURE, {"workspace_id": workspace_id}).first()
    if row is None:  # no row, so no documents nor jobs (foreign keys) and no overrides
        return defaults, Usage(documents=0, stored_bytes=0, queued_jobs=0)
    used = Usage(documents=int(row[0]), stored_bytes=int(row[1]), queued_jobs=int(row[2]))
    quota = Quota(**{name: value if value is not None else getattr(defaults, name)
                     for name, value in zip(QUOTA_FIELDS, row[3:], strict=True)})
    return quota, used


def unfinished_jobs(session: Session, *, workspace_id: str) -> int:
    """Jobs the workspace's requests created that have not ended (parts are the work of
    their parent, which is counted)."""
    return int(session.scalar(_UNFINISHED, {"workspace_id": workspace_id}) or 0)


# Built once: building a statement and its cache key costs more CPU than SQLite takes to run it.
_WORKSPACE = bindparam("workspace_id")
_UNFINISHED = (select(func.count()).select_from(Job)
               .where(Job.workspace_id == _WORKSPACE, Job.state.in_(UNFINISHED_STATES),
                      Job.parent_id.is_(None)))
_MEASURE = (
    select(select(func.count()).select_from(Document)
           .where(Document.workspace_id == _WORKSPACE).scalar_subquery(),
           select(func.coalesce(func.sum(Document.size_bytes), 0))
           .where(Document.workspace_id == _WORKSPACE).scalar_subquery(),
           _UNFINISHED.scalar_subquery(),
           *(getattr(WorkspaceQuota, name) for name in QUOTA_FIELDS))
    .select_from(Workspace)
    .outerjoin(WorkspaceQuota, WorkspaceQuota.workspace_id == Workspace.id)
    .where(Workspace.id == _WORKSPACE)
)
_LOCK = select(Workspace.id).where(Workspace.id == _WORKSPACE).with_for_update()


def lock_workspace(session: Session, *, workspace_id: str) -> None:
    """Serialise quota checks of one workspace until the transaction ends (the workspace row
    must exist: `api.deps.ensure_workspace`)."""
    session.execute(_LOCK, {"workspace_id": workspace_id})


def check_document(session: Session, *, workspace_id: str, quota: Quota, size_bytes: int,
                   retry_after_s: int = 30, used: Usage | None = None) -> None:
    """Raise QuotaExceeded unless one more document of `size_bytes`, and its job, fit
    (`used`: the usage read in this transaction already, by `measure`)."""
    used = used or usage(session, workspace_id=workspace_id)
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
