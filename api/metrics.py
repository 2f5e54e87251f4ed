"""HTTP metrics and `GET /metrics`.

Requests are counted and timed by route template (`/v1/jobs/{job_id}`, never the raw path: one
series per route, not per id) with the method and status; a path no route matches is
`unmatched` and an unknown method `other`, so a scanner cannot blow up the label space.
Uploads are counted with the request body bytes received. `/metrics` shows every process of
this machine (API and workers share the multiprocess directory, see `sluice.metrics`) and the
job ledger's gauges."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice import metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
UPLOAD_ROUTES = frozenset({("POST", "/v1/documents")})

HTTP_REQUESTS = Counter(
    "sluice_http_requests", "HTTP requests by method, route template and status.",
    ("method", "route", "status"))
HTTP_DURATION = Histogram(
    "sluice_http_request_duration_seconds",
    "Time from the request's arrival to the start of its response (an event stream: to its "
    "first byte).", ("method", "route", "status"))
UPLOADS = Counter("sluice_uploads", "Document upload requests by status.", ("status",))
UPLOAD_BYTES = Counter(
    "sluice_upload_bytes", "Request body bytes received by document uploads (multipart "
    "framing included), by status.", ("status",))


def method_label(method: str) -> str:
    method = method.upper()
    return method if method in METHODS else "other"


def route_label(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The template of the route that handled the request: FastAPI's routes put themselves in
    the scope; plain Starlette ones (/docs, /openapi.json) are found by their endpoint."""
    route = scope.get("route")
    if route is None and (endpoint := scope.get("endpoint")) is not None:
        route = next((r for r in routes if getattr(r, "endpoint", None) is endpoint), None)
    template = getattr(route, "path_format", None)
    return template if isinstance(template, str) and template else UNMATCHED


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


def record(
    scope: Scope, *, status: int, seconds: float, body_bytes: int,
    routes: Sequence[BaseRoute] = (),
) -> None:
    method, route = method_label(scope["method"]), route_label(scope, routes)
    code = status_label(status)
    HTTP_REQUESTS.labels(method=method, route=route, status=code).inc()
    HTTP_DURATION.labels(method=method, route=route, status=code).observe(seconds)
    if (method, route) in UPLOAD_ROUTES:
        UPLOADS.labels(status=code).inc()
        UPLOAD_BYTES.labels(status=code).inc(body_bytes)


class MetricsMiddleware:
    """Pure ASGI, outermost: sees the status the client gets and every body byte."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        body_bytes = 0
        recorded = False

        async def counting_receive() -> Message:
            nonlocal body_bytes
            message = await receive()
            if message["type"] == "http.request":
                body_bytes += len(message.get("body", b""))
            return message

        async def recording_send(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                record(scope, status=message["status"], seconds=time.perf_counter() - began,
                       body_bytes=body_bytes, routes=self.routes)
            await send(message)

        try:
            await self.app(scope, counting_receive, recording_send)
        except BaseException:
            if not recorded:  # the server answers 500
                record(scope, status=500, seconds=time.perf_counter() - began,
                       body_bytes=body_bytes, routes=self.routes)
            raise


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {metrics.CONTENT_TYPE: {}}}})
async def prometheus_metrics() -> Response:
    """Prometheus text exposition: this machine's API and worker processes, and the job
    ledger's gauges (queue depth, oldest queued job, running, retrying, dead letters)."""
    body = await run_in_threadpool(metrics.exposition, ledger=True)
    return Response(content=body, media_type=metrics.CONTENT_TYPE)


def install(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware, routes=app.router.routes)  # routes added later too
    app.include_router(router)
