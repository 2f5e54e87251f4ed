"""sluice.db on PostgreSQL: a connection back from the pool within `PING_AFTER_IDLE_S` is used
without a ping; an idle one is pinged, and a dead one replaced before use; a connection killed
within the window fails its statement once, and the pool recovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from sluice import db


@pytest.fixture
def engine(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, list[int]]]:
    engine = db.make_engine(pg_url)
    pings: list[int] = []
    real_ping = engine.dialect.do_ping

    def counting_ping(dbapi_conn: object) -> bool:
        pings.append(1)
        return real_ping(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    yield engine, pings
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _kill(pg_url: str, pid: int) -> None:
    other = db.make_engine(pg_url)
    try:
        with other.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    finally:
        other.dispose()


def test_a_connection_used_moments_ago_is_not_pinged(engine: tuple[Engine, list[int]]) -> None:
    eng, pings = engine
    first = _backend_pid(eng)  # a new connection: pinged (it has never been checked in)
    assert len(pings) == 1
    for _ in range(5):
        assert _backend_pid(eng) == first
    assert len(pings) == 1  # five transactions, no round trip spent on pings


def test_an_idle_connection_is_pinged_and_a_dead_one_replaced(
    engine: tuple[Engine, list[int]], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, pings = engine
    first = _backend_pid(eng)
    _kill(pg_url, first)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # every connection counts as idle now
    second = _backend_pid(eng)  # the ping fails: a fresh connection, and no error
    assert second != first
    assert len(pings) >= 2


def test_a_connection_killed_within_the_window_fails_once_then_the_pool_recovers(
    engine: tuple[Engine, list[int]], pg_url: str
) -> None:
    eng, pings = engine
    first = _backend_pid(eng)
    _kill(pg_url, first)
    with pytest.raises(OperationalError) as failed:
        _backend_pid(eng)
    assert failed.value.connection_invalidated
    assert _backend_pid(eng) != first
