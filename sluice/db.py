"""Database engine and sessions for SQLite (embedded) and PostgreSQL (production).

One engine per process, created lazily; `dispose_engine()` after a fork so a child never
shares its parent's connections.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from sluice.settings import get_settings

_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None
_read_sessionmaker: sessionmaker[Session] | None = None
_autocommit: Engine | None = None
_serialise_writers = False


class _WriterTurn:
    """SQLite: writers take turns here before SQLite's write lock. SQLite lets one writer in at
    a time anyway, but a writer that finds its lock taken sleeps in SQLite's busy handler (1,
    2, 5 ... 100 ms steps) and only then looks again, so under contention the lock stays free
    while waiters sleep; here the next writer is woken the moment it is released: the threads
    of a process by a lock, the processes (the API, each worker, beat) by an `flock` on a file
    beside the database, which the kernel hands to the next waiter at once (and frees when its
    holder dies). Re-entrant: a nested transaction in the same thread behaves as it did
    without it. A process opens its own lock file after a fork (a shared open file would be
    one lock holder for both)."""

    def __init__(self) -> None:
        self._threads = threading.RLock()
        self._depth = 0
        self._path: str | None = None
        self._fd: int | None = None
        self._pid = 0

    def use(self, database: str | None) -> None:
        """Serialise writers to the SQLite file `database` (None or in-memory: threads only)."""
        with self._threads:
            self._close()
            self._path = f"{database}.writers" if database and database != ":memory:" else None

    def _close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> None:
        self._threads.acquire()
        self._depth += 1
        if self._depth > 1 or self._path is None:
            return
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._depth -= 1
            self._threads.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_sqlite_writer = _WriterTurn()


SQLITE_POOL_SIZE = 40


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


PING_AFTER_IDLE_S = 2.0
"""A PostgreSQL connection that waited in the pool longer than this is pinged before it is
used; one returned more recently is trusted. SQLAlchemy's `pool_pre_ping` pings on every
checkout: one round trip more for every transaction (a no-op job makes two, of ~13; 11% of a
busy worker's samples in py-spy, though the jobs/s change stayed within this machine's noise;
it matters more where the server is across a network). If the server
went away within the window, the first statement fails instead: SQLAlchemy sees a disconnect
and drops every pooled connection, and the task's attempt is retried as
`database_unavailable`, as when the server goes away mid-transaction."""


def _with_idle_ping(engine: Engine) -> Engine:
    """Ping a connection on checkout only when it was idle longer than `PING_AFTER_IDLE_S`
    (a failed ping: SQLAlchemy replaces the connection and tries again)."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"ping before use failed: {exc}") from exc

    return engine


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite gets the sqlite-vec extension, WAL and BEGIN IMMEDIATE."""
    if not is_sqlite(url):
        return _with_idle_ping(create_engine(url, pool_size=5, max_overflow=5))

    import pysqlite3.dbapi2 as sqlite3  # built-in sqlite3 here cannot load extensions
    import sqlite_vec

    engine = create_engine(
        url,
        module=sqlite3,
        connect_args={"timeout": 60, "check_same_thread": False},
        pool_pre_ping=False,
        # Every thread of the API's pool (40) may hold one: a connection past the pool's size
        # is closed when returned, and opening one (sqlite-vec, the pragmas) cost a loaded
        # API ~8% of its CPU. Idle ones cost a file handle; none is opened before it is needed.
        pool_size=SQLITE_POOL_SIZE,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, open transactions (see "begin" below).
        dbapi_conn.isolation_level = None
        dbapi_conn.enable_load_extension(True)
        sqlite_vec.load(dbapi_conn)
        dbapi_conn.enable_load_extension(False)
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front: a deferred transaction that reads, then writes,
        # fails with SQLITE_BUSY instead of waiting when another process wrote meanwhile.
        # Read-only sessions (see `read_session`) begin deferred and never block anyone (WAL).
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin",
                                                                         "IMMEDIATE"))

    return engine


def get_engine() -> Engine:
    global _engine, _sessionmaker, _read_sessionmaker, _autocommit, _serialise_writers
    if _engine is None:
        settings = get_settings()
        url = settings.resolved_database_url
        _serialise_writers = is_sqlite(url)
        if is_sqlite(url):
            settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        _engine = make_engine(url)
        if _serialise_writers:
            _sqlite_writer.use(_engine.url.database)
        _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
        _read_sessionmaker = sessionmaker(
            _engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False
        )
        if not _serialise_writers:  # the same pool, each connection in autocommit while out
            _autocommit = _engine.execution_options(isolation_level="AUTOCOMMIT")
    return _engine


def dispose_engine(*, after_fork: bool = False) -> None:
    """Forget this process's engine: after a fork (leaving the parent's connections alone),
    or when settings change in tests."""
    global _engine, _sessionmaker, _read_sessionmaker, _autocommit
    if _engine is not None:
        _engine.dispose(close=not after_fork)
    _engine = None
    _sessionmaker = None
    _read_sessionmaker = None
    _autocommit = None


def new_session() -> Session:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker()


def new_read_session() -> Session:
    """A session for reading only (on SQLite it never takes the write lock)."""
    get_engine()
    assert _read_sessionmaker is not None
    return _read_sessionmaker()


@contextmanager
def read_scope() -> Iterator[Session]:
    """A short read-only transaction."""
    session = new_read_session()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A short transaction: commit on success, roll back on error."""
    session = new_session()
    turn = _sqlite_writer if _serialise_writers else nullcontext()
    try:
        with turn, session.begin():
            yield session
    finally:
        session.close()


@contextmanager
def transition_scope() -> Iterator[Connection]:
    """A Core connection for one of `models.ledger`'s `*_at_once` transitions, which write
    through it what `session_scope` and the ORM would, for less CPU. PostgreSQL: the
    transition is one statement, so the connection is in autocommit (one round trip, where a
    transaction costs BEGIN and COMMIT besides; atomic as any statement is). SQLite: a
    transaction (BEGIN IMMEDIATE, the writers taking turns, as `session_scope`)."""
    engine = get_engine()
    if _autocommit is not None:
        with _autocommit.connect() as conn:
            yield conn
        return
    with _sqlite_writer, engine.begin() as conn:
        yield conn
