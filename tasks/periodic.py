"""Running a periodic task under its lease, so that an accidental second beat (or a duplicate
or late message) does no harm: whoever does not get the lease skips the run."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models import locks
from sluice.db import session_scope

log = logging.getLogger(__name__)

Result = dict[str, Any]


class LeaseLost(Exception):
    """The lease expired and another runner took it: stop before doing more work."""


@dataclass
class Exclusive:
    """The lease a running periodic task holds; `keep()` between units of work extends it
    and raises `LeaseLost` when another runner has taken it over."""

    lease: locks.Lease
    ttl_s: float
    renewals: int = field(default=0)

    def keep(self) -> None:
        with session_scope() as session:
            renewed = locks.renew(session, self.lease, ttl_s=self.ttl_s)
        if renewed is None:
            raise LeaseLost(self.lease.name)
        self.lease = renewed
        self.renewals += 1


def owner_id() -> str:
    """Unique per acquisition: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_exclusive(name: str, *, ttl_s: float, work: Callable[[Exclusive], Result]) -> Result:
    """Run `work` holding the lease `name` (for `ttl_s` seconds, renewed by `keep()`).

    Returns `work`'s result, recorded as the task's last run; `{"skipped": "locked"}` when
    another runner holds the lease, `{"skipped": "lease_lost"}` when it was taken over midway.
    An exception from `work` releases the lease (without recording a run) and propagates."""
    with session_scope() as session:
        lease = locks.acquire(session, name=name, owner=owner_id(), ttl_s=ttl_s)
    if lease is None:
        log.info("maintenance %s: skipped, another runner holds its lease", name)
        return {"skipped": "locked"}
    held = Exclusive(lease=lease, ttl_s=ttl_s)
    try:
        result = work(held)
    except LeaseLost:
        log.warning("maintenance %s: lease lost to another runner; stopped", name)
        return {"skipped": "lease_lost"}
    except BaseException:
        with session_scope() as session:
            locks.release(session, held.lease)
        raise
    with session_scope() as session:
        locks.release(session, held.lease, result=result)
    return result
