"""The dead-letter digest: what is in the dead-letter store, and what died since the last
digest, as one structured log line, and optionally a webhook POST.

"New" counts the jobs that died after the previous digest's `as_of` (recorded as that run's
result), so each death is reported as new once. The webhook is best effort: it is posted
only when something new died, with a timeout, and a failure is logged and recorded in the
result, never raised (the log line is the digest of record).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import httpx

from models import dead_letters
from models.entities import utcnow
from sluice.db import read_scope
from tasks.names import QUEUE_OF_TASK, TASK_OF_STAGE

log = logging.getLogger(__name__)


def summarize(*, since: datetime | None, now: datetime | None = None) -> dict[str, Any]:
    """The digest: totals, and counts by queue and error code."""
    now = now or utcnow()
    with read_scope() as session:
        counts = dead_letters.count_dead(session, since=since, until=now)
    by_queue: dict[str, dict[str, int]] = {}
    for c in counts:
        queue = QUEUE_OF_TASK.get(TASK_OF_STAGE.get(c.stage, ""), c.stage)
        entry = by_queue.setdefault(queue, {"total": 0, "new": 0})
        entry["total"] += c.total
        entry["new"] += c.new
    return {
        "as_of": now.isoformat(),
        "since": since.isoformat() if since else None,
        "total": sum(c.total for c in counts),
        "new": sum(c.new for c in counts),
        "by_queue": by_queue,
        "by_error": [
            {"queue": QUEUE_OF_TASK.get(TASK_OF_STAGE.get(c.stage, ""), c.stage),
             "stage": c.stage, "error_code": c.error_code, "total": c.total, "new": c.new}
            for c in counts
        ],
    }


def report(
    digest: dict[str, Any], *, webhook_url: str | None, timeout_s: float
) -> dict[str, Any]:
    """Log the digest (one line: `dead_letter_digest {json}`) and post it to `webhook_url`
    when set and something new died. Returns the digest with the webhook's outcome."""
    level = logging.WARNING if digest["new"] else logging.INFO
    log.log(level, "dead_letter_digest %s", json.dumps(digest, sort_keys=True),
            extra={"dead_letter_digest": digest})
    outcome: str | None = None
    if webhook_url and digest["new"]:
        outcome = post_webhook(webhook_url, digest, timeout_s=timeout_s)
    return {**digest, "webhook": outcome}


def post_webhook(url: str, digest: dict[str, Any], *, timeout_s: float) -> str:
    """POST the digest as JSON; returns "sent" or why it was not. Never raises."""
    try:
        response = httpx.post(url, json={"event": "dead_letter_digest", **digest},
                              timeout=timeout_s)
        response.raise_for_status()
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        log.warning("dead-letter digest webhook failed: %s", exc)
        return f"failed: {type(exc).__name__}: {exc}"[:500]
    return "sent"


def parse_as_of(previous: dict[str, Any] | None) -> datetime | None:
    """The `as_of` of the previous digest's result, if there was one."""
    value = (previous or {}).get("as_of")
    return datetime.fromisoformat(value) if isinstance(value, str) else None
