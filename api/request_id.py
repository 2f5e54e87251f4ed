"""Request ids: every request gets one, from the client's `X-Request-ID` (when it is a
sensible token) or generated here. It is returned in the response's `X-Request-ID`, put on
every log line written while the request is handled, stored on the jobs the request creates
and carried in their task messages, so the workers' log lines of those jobs carry it too."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.logs import bind_context, reset_context

HEADER = "x-request-id"
# Echoed into headers and logs and stored in a 64-character column: anything else is replaced.
VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,63}", re.ASCII)
QUIET_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

log = logging.getLogger("api.requests")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's request id when it is valid, else a new one."""
    for name, value in headers:
        if name == HEADER.encode():
            candidate = value.decode("latin-1").strip()
            if VALID.fullmatch(candidate):
                return candidate
            break
    return new_request_id()


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so the context it sets is the one the routes, the
    threadpool they call into, and any inner middleware all see. Logs one line per request:
    INFO for writes and errors, DEBUG for reads (job polling and probes would drown the rest)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        token = bind_context(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER.encode()]
                headers.append((HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        method, path = scope["method"], scope["path"]
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s %s failed", method, path)
            raise
        else:
            quiet = method in QUIET_METHODS and status < 400
            log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d %.1f ms", method, path,
                    status, (time.perf_counter() - started) * 1000)
        finally:
            reset_context(token)


def install(app: FastAPI) -> None:
    app.add_middleware(RequestIdMiddleware)
