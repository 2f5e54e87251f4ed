"""Request dependencies: the database session, the caller and the workspace it acts in.

`api.auth` has already identified the caller (an API key, or `X-Workspace` with auth off)
before a route runs; these dependencies check its role. `WorkspaceDep` needs a reader,
`WriterWorkspaceDep` a writer, `AdminWorkspaceDep` an admin (403 otherwise). They only read
the request's state, so they are `async`: FastAPI runs a plain `def` dependency in a thread,
and each hand-off cost a request more CPU than the check itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from api.auth import ADMIN_STATE, CALLER_STATE, WORKSPACE_RE, Caller
from api.errors import ApiError
from models import Role, Workspace
from models.quotas import Quota
from sluice.db import new_read_session
from sluice.settings import Settings, get_settings

__all__ = ["WORKSPACE_RE", "AdminWorkspaceDep", "CallerDep", "SessionDep", "WorkspaceDep",
           "WriterWorkspaceDep", "default_quota", "ensure_workspace"]

api_key_scheme = HTTPBearer(
    scheme_name="ApiKey", auto_error=False,
    description="An API key (`sluice keys create`): `Authorization: Bearer sluice_…`. The "
    "workspace comes from the key. With auth off (the embedded default) send `X-Workspace` "
    "instead.")
admin_token_scheme = HTTPBearer(
    scheme_name="AdminToken", auto_error=False,
    description="The admin token (SLUICE_ADMIN_TOKEN): `Authorization: Bearer <token>`.")


def get_session() -> Iterator[Session]:
    """A read-only session for the request (routes that write use a short `session_scope`)."""
    session = new_read_session()
    try:
        yield session
    finally:
        session.close()


async def get_caller(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(api_key_scheme)],
) -> Caller:
    caller: Caller | None = getattr(request.state, CALLER_STATE, None)
    if caller is None:  # only when the app was built without api.auth's middleware
        raise ApiError(401, "unauthorized", "no authenticated caller")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def _require(caller: Caller, role: Role) -> str:
    if not caller.role.allows(role):
        raise ApiError(403, "forbidden", f"this needs a {role} key; this key is a "
                       f"{caller.role} key")
    return caller.workspace


async def reader_workspace(caller: CallerDep) -> str:
    return _require(caller, Role.READER)


async def writer_workspace(caller: CallerDep) -> str:
    return _require(caller, Role.WRITER)


async def admin_workspace(caller: CallerDep) -> str:
    return _require(caller, Role.ADMIN)


async def require_admin_token(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(admin_token_scheme)],
) -> None:
    if getattr(request.state, ADMIN_STATE, None) is not True:
        raise ApiError(401, "unauthorized", "the admin token was not checked")


def ensure_workspace(session: Session, workspace_id: str) -> None:
    """Create the workspace row on first use (idempotent, safe under concurrency)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Workspace).values(id=workspace_id).on_conflict_do_nothing())


def default_quota(settings: Settings | None = None) -> Quota:
    settings = settings or get_settings()
    return Quota(documents=settings.quota_documents, stored_bytes=settings.quota_stored_bytes,
                 queued_jobs=settings.quota_queued_jobs,
                 answers_per_minute=settings.quota_answers_per_minute)


SessionDep = Annotated[Session, Depends(get_session)]
WorkspaceDep = Annotated[str, Depends(reader_workspace)]
WriterWorkspaceDep = Annotated[str, Depends(writer_workspace)]
AdminWorkspaceDep = Annotated[str, Depends(admin_workspace)]
AdminTokenDep = Annotated[None, Depends(require_admin_token)]
