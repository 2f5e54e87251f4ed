"""API keys of the caller's workspace (an admin key), and who the caller is."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from api.deps import AdminWorkspaceDep, CallerDep, SessionDep, default_quota, ensure_workspace
from api.errors import not_found
from api.schemas import (
    CallerOut,
    ErrorBody,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    QuotaOut,
    QuotaValues,
    UsageOut,
)
from models import keys, quotas
from models.keys import ApiKey
from sluice.db import session_scope

router = APIRouter(prefix="/v1", tags=["keys"])


def key_out(key: ApiKey) -> KeyOut:
    return KeyOut(id=key.id, workspace=key.workspace_id, role=key.role, name=key.name,
                  rate_limit=key.rate_limit, created_at=key.created_at,
                  last_used_at=key.last_used_at, revoked_at=key.revoked_at)


def quota_out(session: Session, workspace: str) -> QuotaOut:
    limits = quotas.effective_quota(session, workspace_id=workspace, defaults=default_quota())
    used = quotas.usage(session, workspace_id=workspace)
    return QuotaOut(
        workspace=workspace,
        limits=QuotaValues(**{n: getattr(limits, n) for n in quotas.QUOTA_FIELDS}),
        overrides=QuotaValues(**quotas.overrides(session, workspace_id=workspace)),
        usage=UsageOut(documents=used.documents, stored_bytes=used.stored_bytes,
                       queued_jobs=used.queued_jobs),
    )


def create_key(workspace: str, body: KeyCreate) -> KeyCreated:
    with session_scope() as session:
        ensure_workspace(session, workspace)
        new = keys.create_key(session, workspace_id=workspace, role=body.role, name=body.name,
                              rate_limit=body.rate_limit)
        return KeyCreated(**key_out(new.key).model_dump(), key=new.token)


@router.get("/workspace", response_model=CallerOut)
def whoami(caller: CallerDep, session: SessionDep) -> CallerOut:
    """The caller's workspace, role and key, with the workspace's quotas and usage."""
    return CallerOut(workspace=caller.workspace, role=caller.role, key_id=caller.key_id,
                     quota=quota_out(session, caller.workspace))


@router.post("/keys", status_code=201, response_model=KeyCreated)
def create_workspace_key(body: KeyCreate, workspace: AdminWorkspaceDep) -> KeyCreated:
    """A new key for the caller's workspace. The response holds the key itself, this once:
    only its hash is kept."""
    return create_key(workspace, body)


@router.get("/keys", response_model=KeyList)
def list_workspace_keys(session: SessionDep, workspace: AdminWorkspaceDep) -> KeyList:
    """The workspace's keys (never the keys themselves), revoked ones included."""
    return KeyList(keys=[key_out(k) for k in keys.list_keys(session, workspace_id=workspace)])


@router.delete("/keys/{key_id}", status_code=204, responses={404: {"model": ErrorBody}})
def revoke_workspace_key(key_id: str, workspace: AdminWorkspaceDep) -> Response:
    """Revoke a key of the workspace: from now on it gets 401."""
    with session_scope() as session:
        if keys.revoke_key(session, key_id=key_id, workspace_id=workspace) is None:
            raise not_found("key", key_id)
    return Response(status_code=204)
