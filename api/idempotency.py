"""`Idempotency-Key`: a POST retried with the same key gets the first response again instead
of doing the work twice. The key is scoped to the workspace and bound to the method, path and
query string; reusing it for a different request is refused (422 `idempotency_key_reused`).
Responses with a 5xx status are not stored, so a retry after a server error runs again.

With API keys the record is also scoped to the API key that made the request (stored as
`<key id>:<Idempotency-Key>`): only that key, authenticated and within its role (`api.auth`
runs first), can get the stored response again."""

from __future__ import annotations

import hashlib

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import CALLER_STATE, Caller
from models.entities import IdempotencyRecord
from sluice.db import read_scope, session_scope

HEADER = "idempotency-key"
HEADER_BYTES = HEADER.encode()  # ASGI header names are lower-case bytes
REPLAYED_HEADER = "Idempotent-Replayed"
KEPT_HEADERS = ("location", "content-type")


def _fingerprint(request: Request) -> str:
    raw = f"{request.method} {request.url.path}?{request.url.query}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _load(workspace: str, key: str) -> IdempotencyRecord | None:
    with read_scope() as session:
        return session.get(IdempotencyRecord, (workspace, key))


def _store(record: IdempotencyRecord) -> None:
    try:
        with session_scope() as session:
            session.add(record)
    except IntegrityError:
        pass  # a concurrent request with the same key stored first; the first answer stands


class _KeyedRequests(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        key = request.headers.get(HEADER)
        if request.method != "POST" or not key:
            return await call_next(request)
        caller: Caller | None = getattr(request.state, CALLER_STATE, None)
        if caller is None:  # not a /v1 route, or refused by api.auth already
            return await call_next(request)
        workspace = caller.workspace
        if caller.key_id is not None:
            key = f"{caller.key_id}:{key}"
        if len(key) > 255:
            return await call_next(request)
        fingerprint = _fingerprint(request)
        stored = await run_in_threadpool(_load, workspace, key)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                return JSONResponse(
                    {"error": {"code": "idempotency_key_reused",
                               "message": "this Idempotency-Key was used for another request"}},
                    status_code=422,
                )
            return Response(content=stored.body, status_code=stored.status_code,
                            headers={**stored.headers, REPLAYED_HEADER: "true"})
        response = await call_next(request)
        if response.status_code >= 500:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
        headers = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
        await run_in_threadpool(_store, IdempotencyRecord(
            workspace_id=workspace, key=key, fingerprint=fingerprint,
            status_code=response.status_code, body=body.decode("utf-8", "replace"),
            headers=headers))
        return Response(content=body, status_code=response.status_code,
                        headers=dict(response.headers))


class IdempotencyMiddleware:
    """Plain ASGI in front: only a POST with the header goes through `BaseHTTPMiddleware`,
    whose extra task and streams cost every other request ~1 ms of CPU."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.keyed = _KeyedRequests(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and any(
                name == HEADER_BYTES for name, _ in scope["headers"]):
            await self.keyed(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_middleware(IdempotencyMiddleware)


__all__ = ["install"]
