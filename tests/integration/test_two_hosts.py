"""Workers on two hosts share one broker and one database: both take work, and when one
host dies mid-run (its worker and pool children SIGKILLed, as a lost machine would be) the
other finishes everything, with no job lost or run twice into duplicate chunks."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from models import JobAttempt
from sluice.db import session_scope
from tests.faults.harness import drain, duplicated_chunks, make_corpus, submit
from tests.stack import StackFactory

pytestmark = pytest.mark.integration

HOSTS = {"worker-a": "sluice@host-a", "worker-b": "sluice@host-b"}


def _attempts() -> list[JobAttempt]:
    with session_scope() as session:
        rows = session.scalars(select(JobAttempt).order_by(JobAttempt.id)).all()
        session.expunge_all()
    return list(rows)


def _kill_host(pid: int) -> None:
    """SIGKILL a worker and its pool children at once: nothing gets to clean up."""
    main = psutil.Process(pid)
    for proc in [*main.children(recursive=True), main]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


def test_two_hosts_share_work_and_the_survivor_finishes(
    production_env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    env = {
        **production_env,
        "SLUICE_HEARTBEAT_INTERVAL_S": "0.3",
        "SLUICE_HEARTBEAT_STALE_S": "4",
        "SLUICE_RECONCILE_INTERVAL_S": "1",
    }
    s = stack(env, workers=0, beat=True, concurrency=1)
    for name, hostname in HOSTS.items():
        s.start_worker(name, hostname=hostname)
    s.wait_ready()
    job_ids = submit(s, make_corpus(tmp_path / "corpus", 16))

    # Wait until both hosts have done work and host B is in the middle of a stage.
    deadline = time.monotonic() + 240
    while True:
        attempts = _attempts()
        finished_by = {a.worker for a in attempts if a.outcome == "succeeded"}
        running_on_b = [a for a in attempts if a.worker == HOSTS["worker-b"] and a.outcome is None]
        if set(HOSTS.values()) <= finished_by and running_on_b:
            break
        assert time.monotonic() < deadline, f"both hosts never took work: {s.logs()}"
        time.sleep(0.05)
    _kill_host(s.procs["worker-b"].pid)
    s.procs["worker-b"].wait(timeout=10)
    # Read after the kill: every later attempt is host A's, every open one of B's was cut off.
    attempts = _attempts()
    killed_at = max(a.id for a in attempts)
    interrupted = {a.job_id for a in attempts
                   if a.worker == HOSTS["worker-b"] and a.outcome is None}

    states = drain(job_ids, timeout=300)
    assert states == dict.fromkeys(job_ids, "succeeded"), s.logs()
    assert duplicated_chunks() == 0
    after = [a for a in _attempts() if a.id > killed_at]
    assert after and {a.worker for a in after} == {HOSTS["worker-a"]}
    # The stage host B was running when it died is recorded as lost and redone by host A.
    lost = {a.job_id for a in _attempts()
            if a.worker == HOSTS["worker-b"] and a.error_code == "worker_lost"}
    assert interrupted <= lost
    assert s.procs["worker-a"].poll() is None
