"""The FastAPI application (OpenAPI at /docs)."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors, idempotency, metrics, request_id
from api.routes import answers, dead_letters, documents, events, health, jobs
from sluice import __version__
from sluice.logs import configure_logging


def create_app() -> FastAPI:
    configure_logging()
    app = FastAPI(
        title="Sluice",
        version=__version__,
        description="Upload documents, ask questions: a job system that never loses a job.",
    )
    errors.install(app)
    idempotency.install(app)
    metrics.install(app)
    app.include_router(documents.router)
    app.include_router(jobs.router)
    app.include_router(answers.router)
    app.include_router(dead_letters.router)
    app.include_router(events.router)
    app.include_router(health.router)
    request_id.install(app)  # last: the outermost middleware, so every line sees the id
    return app
