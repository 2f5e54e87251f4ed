"""The FastAPI application (OpenAPI at /docs)."""

from __future__ import annotations

from fastapi import FastAPI

from api import auth, errors, idempotency, metrics, request_id
from api.routes import admin, answers, dead_letters, documents, events, health, jobs, keys
from api.schemas import ErrorBody
from sluice import __version__
from sluice.logs import configure_logging

AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "`invalid_workspace` (X-Workspace, auth off)"},
    401: {"model": ErrorBody, "description": "No, a malformed, unknown or revoked key"},
    403: {"model": ErrorBody, "description": "The key's role does not allow this"},
    422: {"model": ErrorBody, "description": "`validation_error`: the request is malformed"},
    429: {"model": ErrorBody, "description": "`rate_limited` or a quota; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"},
                                      "description": "Seconds to wait"}}},
    503: {"model": ErrorBody,
          "description": "`database_unavailable`: nothing was recorded; try again",
          "headers": {"Retry-After": {"schema": {"type": "integer"},
                                      "description": "Seconds to wait"}}},
}


def create_app() -> FastAPI:
    configure_logging()
    app = FastAPI(
        title="Sluice",
        version=__version__,
        description="Upload documents, ask questions: a job system that never loses a job.",
    )
    errors.install(app)
    idempotency.install(app)
    auth.install(app)  # outside idempotency: a stored response is only replayed to its key
    metrics.install(app)
    for router in (documents.router, jobs.router, answers.router, dead_letters.router,
                   events.router, keys.router, admin.router):
        app.include_router(router, responses=AUTH_RESPONSES)
    app.include_router(health.router)
    request_id.install(app)  # last: the outermost middleware, so every line sees the id
    return app
