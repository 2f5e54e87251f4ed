"""API errors: every error body is `{"error": {"code": ..., "message": ...}}` with a stable code."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.quotas import QuotaExceeded

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 2


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident} not found")


def _body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(_body(exc.code, exc.message), status_code=exc.status,
                        headers=exc.headers)


def quota_error(exc: QuotaExceeded) -> ApiError:
    """`413` (stored bytes) or `429` with a stable code, and `Retry-After` where waiting
    helps (unfinished jobs drain, the answers window moves on)."""
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return ApiError(exc.status, exc.code, exc.message, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(QuotaExceeded)
    async def _quota(_: Request, exc: QuotaExceeded) -> JSONResponse:
        return error_response(quota_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(_body("validation_error", problems or "invalid request"),
                            status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(request: Request, exc: OperationalError | InterfaceError
                        ) -> JSONResponse:
        # The database went away (restarted, failed over, unreachable) or is locked: nothing
        # was recorded (the transaction rolled back), and trying again is the fix.
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path,
                    exc.orig if exc.orig is not None else exc)
        return JSONResponse(
            _body("database_unavailable",
                  "the database is unavailable; nothing was recorded, try again"),
            status_code=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code)
