"""Leases on periodic tasks, on SQLite and PostgreSQL: one holder at a time, a second refused,
an expired lease taken over, a lost lease never clobbered; and the beat schedule they guard."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

import celeryconfig
from models import locks
from models.entities import MaintenanceLock, utcnow
from sluice.db import session_scope
from sluice.settings import Settings
from tasks import names
from tasks.maintenance import dead_letter_digest
from tasks.periodic import Exclusive, run_exclusive


def _acquire(owner: str, ttl_s: float = 60, name: str = "t") -> locks.Lease | None:
    with session_scope() as session:
        return locks.acquire(session, name=name, owner=owner, ttl_s=ttl_s)


def _row(name: str = "t") -> MaintenanceLock | None:
    with session_scope() as session:
        return session.scalar(select(MaintenanceLock).where(MaintenanceLock.name == name))


def test_second_holder_refused_until_released(any_db: dict[str, str]) -> None:
    first = _acquire("a")
    assert first is not None
    assert _acquire("b") is None
    assert _acquire("a") is not None  # the holder may take its own lease again (extends it)
    with session_scope() as session:
        assert locks.release(session, first, result={"done": 1})
    row = _row()
    assert row is not None and row.owner is None and row.last_result == {"done": 1}
    second = _acquire("b")
    assert second is not None and _row().owner == "b"  # type: ignore[union-attr]


def test_expired_lease_is_taken_over_and_the_old_holder_cannot_clobber_it(
    any_db: dict[str, str],
) -> None:
    old = _acquire("a", ttl_s=-1)  # already expired: its holder died
    assert old is not None
    new = _acquire("b", ttl_s=60)
    assert new is not None
    with session_scope() as session:
        assert locks.renew(session, old, ttl_s=60) is None
        assert not locks.release(session, old, result={"stale": True})
    row = _row()
    assert row is not None and (row.owner, row.last_result) == ("b", None)
    with session_scope() as session:
        renewed = locks.renew(session, new, ttl_s=120)
    assert renewed is not None and renewed.expires_at > new.expires_at
    assert _acquire("c") is None


def test_concurrent_acquirers_exactly_one_wins(any_db: dict[str, str]) -> None:
    owners = [f"w{i}" for i in range(6)]
    barrier = threading.Barrier(len(owners))
    won: list[str] = []
    errors: list[BaseException] = []

    def contend(owner: str) -> None:
        try:
            barrier.wait()
            if _acquire(owner, name="race") is not None:
                won.append(owner)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == 1
    assert _row("race").owner == won[0]  # type: ignore[union-attr]


def test_run_exclusive_skips_while_another_runner_holds_the_lease(
    any_db: dict[str, str],
) -> None:
    other = _acquire("another-beat", name=names.DEAD_LETTER_DIGEST)
    assert other is not None
    assert dead_letter_digest() == {"skipped": "locked"}
    row = _row(names.DEAD_LETTER_DIGEST)
    assert row is not None and row.last_result is None and row.owner == "another-beat"

    with session_scope() as session:
        locks.release(session, other)
    result = dead_letter_digest()
    assert result["total"] == 0 and result["new"] == 0
    row = _row(names.DEAD_LETTER_DIGEST)
    assert row is not None and row.owner is None and row.last_result == result


def test_a_run_that_loses_its_lease_stops_and_records_nothing(any_db: dict[str, str]) -> None:
    steps: list[int] = []

    def work(held: Exclusive) -> dict[str, int]:
        for step in range(3):
            if step == 1:  # the lease expires and another runner takes it
                with session_scope() as session:
                    session.get_one(MaintenanceLock, "slow").expires_at = utcnow() - timedelta(
                        seconds=1)
                assert _acquire("other", name="slow") is not None
            held.keep()
            steps.append(step)
        return {"steps": len(steps)}

    assert run_exclusive("slow", ttl_s=60, work=work) == {"skipped": "lease_lost"}
    assert steps == [0]
    row = _row("slow")
    assert row is not None and (row.owner, row.last_result) == ("other", None)


def test_a_failing_run_releases_its_lease(any_db: dict[str, str]) -> None:
    def work(_held: Exclusive) -> dict[str, int]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_exclusive("failing", ttl_s=600, work=work)
    assert _acquire("next", name="failing") is not None


def test_beat_schedule_routes_every_entry_to_maintenance_and_expires_it() -> None:
    config = celeryconfig.build(Settings())
    schedule = config["beat_schedule"]
    assert {e["task"] for e in schedule.values()} == {
        names.RECONCILE_JOBS, names.PURGE_EXPIRED, names.REEMBED_OUTDATED,
        names.DEAD_LETTER_DIGEST}
    for entry in schedule.values():
        assert entry["options"]["expires"] == entry["schedule"] > 0
        assert config["task_routes"][entry["task"]]["queue"] == names.QUEUE_MAINTENANCE
        assert config["task_annotations"][entry["task"]]["time_limit"] > 0

    trimmed = celeryconfig.build(Settings(reembed_interval_s=None,
                                          dead_letter_digest_interval_s=None))
    assert set(trimmed["beat_schedule"]) == {"reconcile-jobs", "purge-expired"}


def test_migration_0005_up_and_down(any_db: dict[str, str]) -> None:
    from sqlalchemy import inspect

    from sluice import migrate
    from sluice.db import dispose_engine, get_engine

    def tables_and_chunk_indexes() -> tuple[set[str], set[str]]:
        inspector = inspect(get_engine())
        return (set(inspector.get_table_names()),
                {ix["name"] for ix in inspector.get_indexes("chunks")})

    tables, indexes = tables_and_chunk_indexes()
    assert "maintenance_locks" in tables and "ix_chunks_embedding_version" in indexes
    migrate.downgrade(get_engine(), "0004")
    dispose_engine()
    tables, indexes = tables_and_chunk_indexes()
    assert "maintenance_locks" not in tables and "ix_chunks_embedding_version" not in indexes
    migrate.upgrade(get_engine())
    dispose_engine()
    assert _acquire("after-upgrade") is not None


def test_cli_runs_a_beat_entry_now_under_its_lease(sluice_env: dict[str, str]) -> None:
    import json

    from click.testing import CliRunner

    from sluice.cli import main

    runner = CliRunner()
    done = runner.invoke(main, ["maintenance", "run", "dead-letter-digest"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["total"] == 0
    held = _acquire("someone-else", name=names.PURGE_EXPIRED)
    assert held is not None
    skipped = runner.invoke(main, ["maintenance", "run", "purge-expired"])
    assert json.loads(skipped.output) == {"skipped": "locked"}
    assert runner.invoke(main, ["maintenance", "run", "nope"]).exit_code != 0
