"""The operator's API, guarded by the admin token (SLUICE_ADMIN_TOKEN), not by a key: the
keys and quotas of any workspace."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from api.deps import AdminTokenDep, SessionDep, ensure_workspace
from api.errors import not_found
from api.routes.keys import create_key, key_out, quota_out
from api.schemas import (
    WORKSPACE_PATTERN,
    AdminKeyCreate,
    ErrorBody,
    KeyCreated,
    KeyList,
    QuotaOut,
    QuotaValues,
)
from models import keys, quotas
from sluice.db import session_scope

router = APIRouter(prefix="/v1/admin", tags=["admin"])

WorkspacePath = Annotated[str, Path(pattern=WORKSPACE_PATTERN)]


@router.post("/keys", status_code=201, response_model=KeyCreated)
def admin_create_key(body: AdminKeyCreate, _: AdminTokenDep) -> KeyCreated:
    """A new key for any workspace (created on first use). The response holds the key
    itself, this once."""
    return create_key(body.workspace, body)


@router.get("/keys", response_model=KeyList)
def admin_list_keys(
    session: SessionDep,
    _: AdminTokenDep,
    workspace: Annotated[str | None, Query(pattern=WORKSPACE_PATTERN)] = None,
) -> KeyList:
    """Every key, or one workspace's."""
    return KeyList(keys=[key_out(k) for k in keys.list_keys(session, workspace_id=workspace)])


@router.delete("/keys/{key_id}", status_code=204, responses={404: {"model": ErrorBody}})
def admin_revoke_key(key_id: str, _: AdminTokenDep) -> Response:
    """Revoke any key."""
    with session_scope() as session:
        if keys.revoke_key(session, key_id=key_id) is None:
            raise not_found("key", key_id)
    return Response(status_code=204)


@router.get("/workspaces/{workspace}/quotas", response_model=QuotaOut)
def admin_get_quotas(workspace: WorkspacePath, session: SessionDep, _: AdminTokenDep) -> QuotaOut:
    """A workspace's effective quotas, its overrides and its usage."""
    return quota_out(session, workspace)


@router.put("/workspaces/{workspace}/quotas", response_model=QuotaOut)
def admin_set_quotas(workspace: WorkspacePath, body: QuotaValues, _: AdminTokenDep) -> QuotaOut:
    """Replace a workspace's overrides: a null (or missing) value goes back to the default."""
    with session_scope() as session:
        ensure_workspace(session, workspace)
        quotas.set_overrides(session, workspace_id=workspace, values=body.model_dump())
    with session_scope() as session:
        return quota_out(session, workspace)
