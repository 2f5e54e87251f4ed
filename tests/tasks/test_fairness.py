"""Fairness between workspaces on SQLite and PostgreSQL (no worker: the decisions, the ledger
rows and the published messages): a workspace at its in-flight cap has its new jobs held, a
job's end dispatches the oldest held one, hand-offs and retries keep their slot, the answer
lane is apart, replays and parts wait their turn, a stray message never starts a held job,
the reconciler dispatches held jobs round-robin within the caps and never republishes them,
and two racing dispatches cannot take one slot twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from models import Job, JobKind, JobState, Stage, fairness, ledger
from models.entities import utcnow
from sluice.db import new_session, session_scope
from tasks.publish import dispatch, dispatch_everywhere, round_robin

CAP = 2


@pytest.fixture
def capped(any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Either database, the ingest and answer caps at CAP."""
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_WORKSPACE_INFLIGHT_CAP", str(CAP))
    monkeypatch.setenv("SLUICE_WORKSPACE_ANSWER_INFLIGHT_CAP", str(CAP))
    get_settings.cache_clear()
    yield any_db
    get_settings.cache_clear()


@pytest.fixture
def client(capped: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def _upload(client: TestClient, workspace: str, n: int) -> str:
    resp = client.post("/v1/documents", files={"file": (f"{workspace}-{n}.txt",
                                                        f"document {n} of {workspace}".encode())},
                       headers={"X-Workspace": workspace})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["job_id"])


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def _held(job_ids: list[str]) -> list[bool]:
    return [_job(j).held for j in job_ids]


def _published(job_ids: list[str]) -> list[bool]:
    return [_job(j).published_at is not None for j in job_ids]


def _messages(env: dict[str, str]) -> str:
    """Every message on the filesystem broker, as one text (job ids are in the bodies)."""
    queue = Path(env["SLUICE_DATA_DIR"]) / "broker" / "queue"
    return "".join(p.read_text() for p in sorted(queue.glob("*")))


def _start(job_id: str, stage: str = Stage.PARSE) -> ledger.Claim | None:
    with session_scope() as session:
        return ledger.start(session, job_id=job_id, stage=stage, worker="w",
                            stale_before=utcnow() - timedelta(minutes=1))


def _in_flight(workspace: str, lane: str = fairness.INGEST) -> int:
    with session_scope() as session:
        return fairness.room(session, workspace_id=workspace, lane=lane).in_flight


def _create(workspace: str, *, kind: JobKind = JobKind.INGEST, held: bool = True) -> str:
    from api.deps import ensure_workspace

    stage = Stage.ANSWER if kind == JobKind.ANSWER else Stage.PARSE
    with session_scope() as session:
        ensure_workspace(session, workspace)
        return ledger.create_job(session, workspace_id=workspace, kind=kind, stage=stage,
                                 held=held).id


def test_a_workspace_at_its_cap_holds_its_new_jobs_and_no_other(
    client: TestClient, capped: dict[str, str]
) -> None:
    flood = [_upload(client, "a", n) for n in range(5)]
    assert _held(flood) == [False, False, True, True, True]
    assert _published(flood) == [True, True, False, False, False]
    messages = _messages(capped)
    assert all(j in messages for j in flood[:2]) and not any(j in messages for j in flood[2:])
    shown = client.get(f"/v1/jobs/{flood[2]}", headers={"X-Workspace": "a"}).json()
    assert (shown["state"], shown["held"]) == ("queued", True)
    assert client.get(f"/v1/jobs/{flood[0]}", headers={"X-Workspace": "a"}).json()["held"] is False

    other = _upload(client, "b", 0)  # another workspace: its own slots
    assert _held([other]) == [False] and other in _messages(capped)
    # Questions are a lane of their own: not held behind the workspace's documents.
    asked = client.post("/v1/answers", json={"question": "anything?"},
                        headers={"X-Workspace": "a"}).json()["job_id"]
    assert _held([asked]) == [False] and asked in _messages(capped)
    with session_scope() as session:
        assert fairness.room(session, workspace_id="a", lane=fairness.INGEST) == fairness.Room(
            in_flight=CAP, held=True)
        assert fairness.room(session, workspace_id="a", lane=fairness.ANSWER) == fairness.Room(
            in_flight=1, held=False)
        assert fairness.held_position(session, session.get_one(Job, flood[4])) == 2
        assert fairness.held_position(session, session.get_one(Job, flood[0])) is None


def test_a_job_that_ends_dispatches_the_oldest_held_job(
    client: TestClient, capped: dict[str, str]
) -> None:
    flood = [_upload(client, "a", n) for n in range(5)]
    first = _start(flood[0])
    assert first is not None
    # A hand-off to the next stage keeps the job's slot: nothing more goes out.
    with session_scope() as session:
        assert ledger.advance(session, first, next_stage=Stage.EMBED)
    assert _in_flight("a") == CAP
    assert dispatch("a", JobKind.INGEST) == 0
    # A retry keeps it too.
    embed = _start(flood[0], Stage.EMBED)
    assert embed is not None
    with session_scope() as session:
        assert ledger.retry_or_bury(session, embed, max_retries=3, delay_s=0, code="x",
                                    message="hiccup") == JobState.RETRYING
    assert _in_flight("a") == CAP and dispatch("a", JobKind.INGEST) == 0
    # The end frees it: the oldest held job goes out, the others stay held.
    embed = _start(flood[0], Stage.EMBED)
    assert embed is not None
    with session_scope() as session:
        assert ledger.succeed(session, embed, result={})
    assert _in_flight("a") == CAP - 1
    assert dispatch("a", JobKind.INGEST) == 1
    assert _held(flood[2:]) == [False, True, True]
    assert flood[2] in _messages(capped) and flood[3] not in _messages(capped)
    assert _in_flight("a") == CAP
    # A cancel frees a slot as well (through the API, which dispatches after commit).
    assert client.post(f"/v1/jobs/{flood[1]}/cancel",
                       headers={"X-Workspace": "a"}).json()["state"] == "cancelled"
    assert _held(flood[3:]) == [False, True]


def test_a_stray_message_never_starts_a_held_job(capped: dict[str, str]) -> None:
    held = _create("a")
    assert _start(held) is None  # e.g. a duplicate delivery: it waits for its turn
    assert _job(held).state == JobState.QUEUED
    assert dispatch("a", JobKind.INGEST) == 1
    assert _start(held) is not None


def test_replayed_jobs_wait_for_slots_like_new_ones(
    client: TestClient, capped: dict[str, str]
) -> None:
    dead = []
    for _ in range(CAP + 2):
        job_id = _create("default", kind=JobKind.ANSWER, held=False)
        claim = _start(job_id, Stage.ANSWER)
        assert claim is not None
        with session_scope() as session:
            ledger.retry_or_bury(session, claim, max_retries=0, delay_s=0, code="timeout",
                                 message="slow", traceback="Traceback")
        dead.append(job_id)
    replayed = client.post("/v1/dead-letters/replay").json()["replayed"]
    assert sorted(replayed) == sorted(dead)
    assert sorted(_held(dead)) == [False] * CAP + [True] * 2
    assert _in_flight("default", fairness.ANSWER) == CAP


def test_parts_are_held_and_go_first(capped: dict[str, str]) -> None:
    parent = _create("a", held=False)
    later = _create("a")  # a document held before the split
    claim = _start(parent)
    assert claim is not None
    with session_scope() as session:
        parts = ledger.split(session, claim, held=True, parts=[{"label": str(i)}
                                                              for i in range(3)])
    assert parts is not None and _held(parts) == [True] * 3
    assert _in_flight("a") == 0  # the waiting parent holds no slot
    assert dispatch("a", JobKind.INGEST) == CAP
    assert sorted(_held(parts)) == [False, False, True] and _held([later]) == [True]


def test_the_reconciler_dispatches_round_robin_within_caps_and_never_republishes_held(
    capped: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tasks.publish

    sent: list[str] = []
    real_publish = tasks.publish.publish

    def recording_publish(job_id: str, stage: str, **kwargs: object) -> bool:
        sent.append(job_id)
        return real_publish(job_id, stage, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tasks.publish, "publish", recording_publish)
    # Held jobs with free slots: the dispatch after some job's end was missed (a killed worker).
    a = [_create("a") for _ in range(5)]
    b = [_create("b") for _ in range(1)]
    busy = [_create("c", held=False) for _ in range(CAP)] + [_create("c")]  # c is at its cap
    with session_scope() as session:
        due = ledger.jobs_needing_publish(session, queued_before=utcnow() + timedelta(hours=1))
        assert {j.id for j in due} == set(busy[:CAP])  # the lost-message path: never held
    assert dispatch_everywhere(limit=500) == CAP + 1
    assert _held(a) == [False] * CAP + [True] * 3 and _held(b) == [False]
    assert _held(busy) == [False] * CAP + [True]
    assert sent == [a[0], b[0], a[1]]  # round-robin: one per workspace in turn, oldest first
    assert all(j in _messages(capped) for j in sent)
    assert dispatch_everywhere(limit=500) == 0  # at the caps now


def test_the_reconcile_task_dispatches_held_jobs(capped: dict[str, str]) -> None:
    from tasks.maintenance import _reconcile

    class Lease:
        def keep(self) -> None:
            pass

    held = [_create("a") for _ in range(CAP + 1)]
    result = _reconcile(Lease())  # type: ignore[arg-type]
    assert result["dispatched"] == CAP and result["republished"] == 0
    assert _held(held) == [False] * CAP + [True]


def test_round_robin_shares_a_budget_in_turns() -> None:
    assert round_robin({"a": 5, "b": 1, "c": 3}, budget=6) == {"a": 3, "b": 1, "c": 2}
    assert round_robin({"a": 5, "b": 1}, budget=100) == {"a": 5, "b": 1}
    assert round_robin({"a": 2, "b": 2}, budget=1) == {"a": 1, "b": 0}
    assert round_robin({}, budget=3) == {}


def test_uncapped_lanes_dispatch_every_held_job(capped: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.settings import get_settings

    held = [_create("a") for _ in range(CAP + 3)]
    monkeypatch.setenv("SLUICE_WORKSPACE_INFLIGHT_CAP", "none")
    get_settings.cache_clear()
    assert get_settings().workspace_inflight_cap is None
    assert dispatch("a", JobKind.INGEST) == CAP + 3
    assert _held(held) == [False] * (CAP + 3)


def test_two_racing_dispatches_take_each_slot_once(pg_env: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The second dispatch waits on the workspace's lock until the first commits, then counts
    the jobs it dispatched as in flight."""
    from sluice.settings import get_settings

    monkeypatch.setenv("SLUICE_WORKSPACE_INFLIGHT_CAP", str(CAP))
    get_settings.cache_clear()
    held = [_create("a") for _ in range(CAP + 3)]
    first = new_session()
    first.begin()
    taken = fairness.dispatch(first, workspace_id="a", lane=fairness.INGEST, cap=CAP)
    assert len(taken) == CAP
    second: list[list[ledger.Dispatch]] = []

    def race() -> None:
        with session_scope() as session:
            second.append(fairness.dispatch(session, workspace_id="a", lane=fairness.INGEST,
                                            cap=CAP))

    thread = threading.Thread(target=race)
    thread.start()
    _wait_for_lock_wait()
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert second == [[]]
    assert sorted(_held(held)) == [False] * CAP + [True] * 3
    get_settings.cache_clear()


def _wait_for_lock_wait(timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            if session.scalar(text("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE wait_event_type = 'Lock'")):
                return
        time.sleep(0.05)
    raise AssertionError("the second dispatch never waited on the lock")


def test_held_jobs_are_counted_apart_per_lane(capped: dict[str, str]) -> None:
    _create("a", kind=JobKind.ANSWER, held=False)
    _create("a", held=True)
    with session_scope() as session:
        assert fairness.room(session, workspace_id="a", lane=fairness.ANSWER) == fairness.Room(
            in_flight=1, held=False)
        assert fairness.room(session, workspace_id="a", lane=fairness.INGEST) == fairness.Room(
            in_flight=0, held=True)
        assert fairness.workspaces_with_held(session, lane=fairness.INGEST) == ["a"]
        assert fairness.workspaces_with_held(session, lane=fairness.ANSWER) == []
        assert session.scalar(select(Job.id).where(Job.held.is_(True))) is not None
