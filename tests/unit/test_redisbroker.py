"""A channel of the Redis transport closed after its connection let its transport go, holding
an unacknowledged message: a connection error (which Celery's reconnect ignores), not an
AttributeError that stops the worker (`workers.redisbroker`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis as redis_client
from kombu import Connection, Exchange, Queue
from kombu.common import ignore_errors

from workers import redisbroker


@pytest.fixture
def channel_holding_a_message(redis_url: str) -> Iterator[tuple[Connection, object]]:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    conn = Connection(redis_url, transport_options={"global_keyprefix": prefix})
    channel = conn.channel()
    queue = Queue("q", Exchange("q"), "q", channel=channel)
    conn.Producer(channel=channel).publish({"n": 1}, exchange=queue.exchange, routing_key="q",
                                           declare=[queue])
    assert queue.get(no_ack=False) is not None  # delivered, not acknowledged
    channel.connection.client = None  # what `Connection._do_close_transport` leaves
    try:
        yield conn, channel
    finally:
        server = redis_client.Redis.from_url(redis_url)
        for key in server.scan_iter(f"{prefix}*"):
            server.delete(key)
        for key in server.scan_iter("_kombu.binding.q"):
            server.delete(key)


def test_closing_it_is_a_connection_error_that_the_reconnect_ignores(
    channel_holding_a_message: tuple[Connection, object],
) -> None:
    conn, channel = channel_holding_a_message
    redisbroker.install()
    ignore_errors(conn, channel.close)  # as Celery's consumer closes a broken connection
    assert channel.closed  # type: ignore[attr-defined]


def test_kombu_alone_still_raises_attribute_error_there(
    channel_holding_a_message: tuple[Connection, object], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When kombu handles this itself, this fails: `workers.redisbroker` can go."""
    from kombu.transport import redis

    monkeypatch.setattr(redis.Channel, "_connparams", redisbroker._original_connparams)
    conn, channel = channel_holding_a_message
    with pytest.raises(AttributeError, match="hostname"):
        ignore_errors(conn, channel.close)
