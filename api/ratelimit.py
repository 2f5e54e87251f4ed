"""Moving-window rate limits (the `limits` package): requests per API key, answers per minute
per workspace.

The windows live in Redis when the broker is Redis (shared by every API process, keys under
the broker key prefix), else in this process's memory (the embedded default runs one API
process); `SLUICE_RATE_LIMIT_STORAGE_URL` overrides. If the storage cannot be reached the
request is let through and a warning logged: a limiter outage must not take the API down."""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

from limits import RateLimitItem, parse, storage, strategies
from limits.errors import StorageError

from sluice.settings import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "sluice-ratelimit"


@lru_cache(maxsize=8)
def _limiter(url: str, prefix: str, scope: str) -> strategies.MovingWindowRateLimiter:
    # `scope` (the database) only separates the in-memory windows of different deployments
    # sharing one process (tests).
    options: dict[str, str | bool] = {"wrap_exceptions": True}
    if url.startswith(("redis", "rediss", "valkey")):
        options["key_prefix"] = prefix
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(url, **options))


def limiter() -> strategies.MovingWindowRateLimiter:
    settings = get_settings()
    return _limiter(settings.resolved_rate_limit_storage_url,
                    f"{settings.broker_key_prefix}{KEY_PREFIX}", settings.resolved_database_url)


@lru_cache(maxsize=64)
def _item(limit: str) -> RateLimitItem:
    return parse(limit)


def per_minute(amount: int) -> str:
    return f"{amount}/minute"


def hit(limit: str, *identifiers: str) -> int | None:
    """Count one request against `limit` (e.g. `"100/minute"`) for `identifiers`. None when
    it is allowed; else the seconds until one would be (for `Retry-After`)."""
    item = _item(limit)
    if item.amount <= 0:
        return item.get_expiry()
    rate = limiter()
    try:
        if rate.hit(item, *identifiers):
            return None
        stats = rate.get_window_stats(item, *identifiers)
    except StorageError as exc:
        log.warning("rate-limit storage unavailable, request let through: %s", exc.storage_error)
        return None
    return max(1, math.ceil(stats.reset_time - time.time()))
