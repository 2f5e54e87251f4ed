"""Logging for every process: plain lines by default, JSON lines with SLUICE_LOG_JSON=1.

Every line carries the context it was logged in: the request id of the HTTP request that
started the work (set by the API's middleware, carried in task headers and on the job row),
and in a worker the job, document, workspace and stage of the task. One grep for a request id
follows a document from upload to ready across the API's and the workers' logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

from sluice.settings import get_settings

CONTEXT_KEYS = ("request_id", "job_id", "document_id", "workspace_id", "stage")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "sluice_log_context", default=_EMPTY
)


def bind_context(**fields: str | None) -> contextvars.Token[Mapping[str, str]]:
    """Add `fields` (None values are left out) to the log context of the current task or
    request; `reset_context(token)` restores what was there before."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    return _context.set(MappingProxyType(merged))


def reset_context(token: contextvars.Token[Mapping[str, str]]) -> None:
    _context.reset(token)


def clear_context() -> None:
    _context.set(_EMPTY)


def current_context() -> Mapping[str, str]:
    return _context.get()


def current_request_id() -> str | None:
    return _context.get().get("request_id")


class ContextFilter(logging.Filter):
    """Puts the current log context on each record (fields given with `extra=` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.process,
        }
        for key in CONTEXT_KEYS:
            if getattr(record, key, None) is not None:
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class PlainFormatter(logging.Formatter):
    """A readable line, ending with the context as `[request_id=... job_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = " ".join(f"{key}={getattr(record, key)}" for key in CONTEXT_KEYS
                          if getattr(record, key, None) is not None)
        return f"{line} [{fields}]" if fields else line


def configure_logging() -> None:
    settings = get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else PlainFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # uvicorn installs its own handlers before it builds the app: send its lines through ours
    # (same format, same context) instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server_log = logging.getLogger(name)
        server_log.handlers.clear()
        server_log.propagate = True
