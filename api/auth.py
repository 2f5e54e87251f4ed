"""Who is calling: API keys (`Authorization: Bearer sluice_…`), the admin token, rate limits.

Authentication runs as middleware in front of every `/v1` route, before the body is read or
validated, so every endpoint answers a missing, malformed, unknown or revoked key with `401`
whatever else is wrong with the request. It leaves the `Caller` (key id, workspace, role) in
the request state; the routes' dependencies (`api.deps`) check the role (`403`). With auth off
(the embedded default; `SLUICE_ENV=production` refuses it) the caller is an admin of the
workspace named by `X-Workspace`. `/v1/admin/…` takes the admin token instead of a key.
`/healthz`, `/readyz`, `/metrics` and the OpenAPI pages carry no workspace's data and stay
open."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api import ratelimit
from api.errors import ApiError, error_response
from models.entities import utcnow
from models.keys import Role, find_active_key, touch
from sluice.db import read_scope, session_scope
from sluice.logs import bind_context
from sluice.settings import get_settings

WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CALLER_STATE = "sluice_caller"
ADMIN_STATE = "sluice_admin"
ADMIN_PREFIX = "/v1/admin"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sluice"'}


@dataclass(frozen=True, slots=True)
class Caller:
    workspace: str
    role: Role
    key_id: str | None
    """None when auth is off (the workspace came from `X-Workspace`)."""


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers=_CHALLENGE)


def _bearer(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization")
    if not value:
        raise _unauthorized("unauthorized", "send the API key as `Authorization: Bearer <key>`")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("invalid_key", "the Authorization header must be `Bearer <key>`")
    return token.strip()


def workspace_header(headers: Mapping[str, str]) -> str:
    workspace = headers.get("x-workspace", "default")
    if not WORKSPACE_RE.match(workspace):
        raise ApiError(400, "invalid_workspace",
                       "X-Workspace must be 1-64 characters of letters, digits, '_', '-', '.'")
    return workspace


@dataclass(frozen=True, slots=True)
class _Resolved:
    caller: Caller
    rate_limit: str | None
    last_used_at: datetime | None


def _resolve(headers: Mapping[str, str]) -> _Resolved:
    settings = get_settings()
    if not settings.auth_enabled:
        return _Resolved(Caller(workspace=workspace_header(headers), role=Role.ADMIN,
                                key_id=None), None, None)
    token = _bearer(headers)
    with read_scope() as session:
        key = find_active_key(session, token)
        if key is None:
            raise _unauthorized("invalid_key", "unknown or revoked API key")
        resolved = _Resolved(Caller(workspace=key.workspace_id, role=Role(key.role),
                                    key_id=key.id),
                             key.rate_limit or settings.rate_limit_per_key, key.last_used_at)
    named = headers.get("x-workspace")
    if named is not None and named != resolved.caller.workspace:
        raise ApiError(403, "forbidden", "this key belongs to another workspace than X-Workspace")
    return resolved


def identify(headers: Mapping[str, str]) -> Caller:
    """The caller a request's headers name, without counting the request (no rate limit,
    no last-used time). Raises ApiError 400/401/403."""
    return _resolve(headers).caller


def authenticate(headers: Mapping[str, str]) -> Caller:
    """`identify`, then count the request against the key's rate limit (429 over it) and
    record the key's use."""
    resolved = _resolve(headers)
    key_id = resolved.caller.key_id
    if key_id is None:
        return resolved.caller
    limit = resolved.rate_limit
    if limit is not None and (wait := ratelimit.hit(limit, "key", key_id)) is not None:
        raise ApiError(429, "rate_limited", f"this key is limited to {limit}; retry in {wait} s",
                       headers={"Retry-After": str(wait)})
    now = utcnow()
    interval = timedelta(seconds=get_settings().key_touch_interval_s)
    last = resolved.last_used_at
    if last is None or (last if last.tzinfo else last.replace(tzinfo=UTC)) <= now - interval:
        with session_scope() as session:
            touch(session, key_id=key_id, now=now, interval=interval)
    return resolved.caller


def check_admin_token(headers: Mapping[str, str]) -> None:
    token = get_settings().admin_token
    if token is None:
        raise _unauthorized("admin_api_disabled",
                            "the admin API is off: set SLUICE_ADMIN_TOKEN to use it")
    sent = _bearer(headers)
    if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise _unauthorized("invalid_admin_token", "wrong admin token")


def is_guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class AuthMiddleware:
    """Pure ASGI: resolves the caller of every `/v1` request before the route runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        try:
            if scope["path"] == ADMIN_PREFIX or scope["path"].startswith(ADMIN_PREFIX + "/"):
                check_admin_token(headers)
                state[ADMIN_STATE] = True
            else:
                # With auth off there are only headers to read: no thread (and its hand-off)
                caller = (await run_in_threadpool(authenticate, headers)
                          if get_settings().auth_enabled else authenticate(headers))
                state[CALLER_STATE] = caller
                bind_context(workspace_id=caller.workspace)
        except ApiError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_middleware(AuthMiddleware)
