"""The Redis broker: a worker whose broker connection breaks while it holds unacknowledged
messages must reconnect, not die.

On a lost connection Celery's consumer closes the broken connection before it reconnects,
ignoring connection errors (`on_connection_error_after_connected`). Closing a channel of the
Redis transport gives its unacknowledged messages back, which needs a Redis client; when the
connection's transport was already let go (its `client` is None), kombu's `_connparams` raises
AttributeError instead, which nothing ignores: the consumer's restart fails, the worker stops,
and every message after it waits for a new worker (seen here when Redis restarted under load;
celery/celery#10205 and #10302 report workers that stop consuming after a reset). Here that
case raises a `ConnectionError`, one of the transport's connection errors, so the close is
ignored as Celery means it to be and the consumer reconnects. The messages that channel held
are restored as any unacknowledged Redis message is (after its visibility timeout), and their
jobs are in the ledger regardless: the reconciler republishes a queued job whose message is gone.

`install()` patches the transport; `workers.app` calls it, in every process.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis

_original_connparams = redis.Channel._connparams


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection.client is None:
        raise ConnectionError("the broker connection of this channel was closed")
    return _original_connparams(self, asynchronous=asynchronous)


def install() -> None:
    redis.Channel._connparams = _connparams
