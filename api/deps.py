"""Request dependencies: the database session and the workspace."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from api.errors import ApiError
from models import Workspace
from sluice.db import new_read_session

WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def get_session() -> Iterator[Session]:
    """A read-only session for the request (routes that write use a short `session_scope`)."""
    session = new_read_session()
    try:
        yield session
    finally:
        session.close()


def get_workspace(x_workspace: Annotated[str, Header()] = "default") -> str:
    """The workspace the request acts in (from `X-Workspace` until API keys land)."""
    if not WORKSPACE_RE.match(x_workspace):
        raise ApiError(400, "invalid_workspace",
                       "X-Workspace must be 1-64 characters of letters, digits, '_', '-', '.'")
    return x_workspace


def ensure_workspace(session: Session, workspace_id: str) -> None:
    """Create the workspace row on first use (idempotent, safe under concurrency)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Workspace).values(id=workspace_id).on_conflict_do_nothing())


SessionDep = Annotated[Session, Depends(get_session)]
WorkspaceDep = Annotated[str, Depends(get_workspace)]
