"""Leases on periodic tasks: a `maintenance_locks` row per task, taken by compare-and-set.

The same statements are correct on SQLite and PostgreSQL. Acquiring is one
`INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE <free, expired or already ours>
RETURNING name`: PostgreSQL locks the conflicting row and re-checks the WHERE clause against
its latest version, SQLite runs writers one at a time (`BEGIN IMMEDIATE`), so of two
concurrent acquirers exactly one gets a row back. A lease expires so that a holder that died
(killed worker, lost machine) does not block the task for ever; a holder that runs long keeps
it with `renew`. Expiry compares the callers' clocks, which are assumed NTP-synchronised.

Like the ledger, these functions take a Session and never commit: each is meant to be its own
short transaction, never held across the work the lease protects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.entities import MaintenanceLock, utcnow


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    owner: str
    expires_at: datetime


def acquire(
    session: Session, *, name: str, owner: str, ttl_s: float, now: datetime | None = None
) -> Lease | None:
    """Take the lease on `name` for `ttl_s` seconds; None when another owner holds it and it
    has not expired. Taking a lease already held by `owner` extends it."""
    now = now or utcnow()
    expires_at = now + timedelta(seconds=ttl_s)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(MaintenanceLock).values(
        name=name, owner=owner, acquired_at=now, expires_at=expires_at
    )
    table = MaintenanceLock.__table__.c
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.name],
        set_={"owner": owner, "acquired_at": now, "expires_at": expires_at},
        where=or_(table.owner.is_(None), table.expires_at.is_(None), table.expires_at <= now,
                  table.owner == owner),
    ).returning(table.name)
    if session.execute(stmt).first() is None:
        return None
    return Lease(name=name, owner=owner, expires_at=expires_at)


def renew(session: Session, lease: Lease, *, ttl_s: float) -> Lease | None:
    """Extend a lease still held; None when it was lost (it expired and was taken over)."""
    now = utcnow()
    expires_at = now + timedelta(seconds=ttl_s)
    result = session.execute(
        update(MaintenanceLock)
        .where(MaintenanceLock.name == lease.name, MaintenanceLock.owner == lease.owner)
        .values(expires_at=expires_at)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return Lease(name=lease.name, owner=lease.owner, expires_at=expires_at)


def release(session: Session, lease: Lease, *, result: dict[str, Any] | None = None) -> bool:
    """Give the lease back, recording the run's `result` (when given) as the task's last run.
    False when the lease had already been lost: the new holder's row is left alone."""
    values: dict[str, Any] = {"owner": None, "expires_at": None}
    if result is not None:
        values.update(last_finished_at=utcnow(), last_result=result)
    done = session.execute(
        update(MaintenanceLock)
        .where(MaintenanceLock.name == lease.name, MaintenanceLock.owner == lease.owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def last_result(session: Session, name: str) -> dict[str, Any] | None:
    """What the last completed run of `name` recorded."""
    value: dict[str, Any] | None = session.scalar(
        select(MaintenanceLock.last_result).where(MaintenanceLock.name == name)
    )
    return value
