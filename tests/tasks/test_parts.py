"""The fan-in of a job split into parts, on SQLite and PostgreSQL: the counter, exactly-once
completion, duplicate deliveries, failure and replay, cancel; the last two parts completed by
two racing sessions on PostgreSQL; and a part task whose page range is not in its PDF."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from models import (
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobAttempt,
    JobEvent,
    JobKind,
    JobState,
    Stage,
    ledger,
)
from models.entities import utcnow
from pipelines.pdfparts import PageRange, plan
from sluice.db import new_session, session_scope
from tests.conftest import DATA

WS = "ws"
PDF = DATA / "qa" / "docugami-sec-10-q" / "data" / "v1" / "docs" / "2022 Q3 AAPL.pdf"


def _split(parts: int) -> tuple[str, list[str]]:
    """A document whose ingest job is running parse and splits into `parts` parts."""
    from api.deps import ensure_workspace

    with session_scope() as session:
        ensure_workspace(session, WS)
        doc = Document(workspace_id=WS, filename="big.pdf", content_type="application/pdf",
                       sha256="0" * 64, size_bytes=1)
        session.add(doc)
        session.flush()
        parent_id = ledger.create_job(session, workspace_id=WS, kind=JobKind.INGEST,
                                      stage=Stage.PARSE, document_id=doc.id,
                                      request_id="req-1").id
    claim = _start(parent_id)
    assert claim is not None
    with session_scope() as session:
        part_ids = ledger.split(session, claim, parts=[
            {"part": {"index": r.index}, "label": r.label}
            for r in plan(parts * 10, part_pages=10)
        ])
    assert part_ids is not None and len(part_ids) == parts
    return parent_id, part_ids


def _start(job_id: str, worker: str = "w1", stale_s: float = 60) -> ledger.Claim | None:
    with session_scope() as session:
        return ledger.start(session, job_id=job_id, stage=Stage.PARSE, worker=worker,
                            stale_before=utcnow() - timedelta(seconds=stale_s))


def _succeed(claim: ledger.Claim) -> ledger.FanIn | None:
    with session_scope() as session:
        return ledger.succeed_part(session, claim, result={"chunks": 1})


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def _document(parent_id: str) -> Document:
    with session_scope() as session:
        return session.get_one(Document, session.get_one(Job, parent_id).document_id)


def _counts(parent_id: str) -> tuple[str, int, int, int]:
    job = _job(parent_id)
    return job.state, job.parts_total, job.parts_done, job.parts_failed


def _exhaust(part_id: str) -> JobState | None:
    """Fail every attempt transiently until the part is dead."""
    while True:
        claim = _start(part_id)
        assert claim is not None
        with session_scope() as session:
            state = ledger.retry_or_bury(session, claim, max_retries=1, delay_s=0,
                                         code="timeout", message="too slow")
        if state != JobState.RETRYING:
            return state


def test_split_parks_the_parent_and_queues_its_parts(any_db: dict[str, str]) -> None:
    parent_id, part_ids = _split(3)
    parent = _job(parent_id)
    assert (parent.state, parent.stage, parent.parts_total, parent.parts_done) == (
        JobState.WAITING, Stage.PARSE, 3, 0)
    with session_scope() as session:
        parts = session.scalars(select(Job).where(Job.parent_id == parent_id)).all()
        assert sorted(p.id for p in parts) == sorted(part_ids)
        assert {(p.kind, p.state, p.stage, p.document_id, p.request_id) for p in parts} == {
            (JobKind.INGEST_PART, JobState.QUEUED, Stage.PARSE, None, "req-1")}
        assert sorted(p.payload["label"] for p in parts) == [
            "pages 1-10", "pages 11-20", "pages 21-30"]
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == parent_id)).one()
        assert attempt.outcome == "split" and attempt.ended_at is not None
        # The reconciler publishes the parts, never the waiting parent, and no heartbeat is
        # expected from it.
        due = ledger.jobs_needing_publish(session, queued_before=utcnow() + timedelta(seconds=1))
        assert {j.id for j in due} == set(part_ids)
        assert ledger.stale_running(session, stale_before=utcnow() + timedelta(hours=1)) == []
    assert _start(parent_id) is None  # a late delivery of the parent's parse does nothing


def test_the_last_part_releases_the_parent_exactly_once(any_db: dict[str, str]) -> None:
    parent_id, part_ids = _split(3)
    claims = [_start(p, worker=f"w{i}") for i, p in enumerate(part_ids)]
    assert all(claims)
    first = _succeed(claims[0])  # type: ignore[arg-type]
    assert first is not None and (first.done, first.failed, first.released) == (1, 0, None)
    # A duplicate delivery of a finished part neither runs nor counts again.
    assert _start(part_ids[0], worker="w9") is None
    assert _succeed(claims[0]) is None  # type: ignore[arg-type]
    with session_scope() as session:
        assert not ledger.succeed(session, claims[0], result={})  # type: ignore[arg-type]
        assert not ledger.fail(session, claims[0], code="x", message="late")  # type: ignore[arg-type]
    assert _counts(parent_id) == (JobState.WAITING, 3, 1, 0)
    assert _job(parent_id).progress == pytest.approx(ledger.PARTS_PROGRESS_SHARE / 3)

    second = _succeed(claims[1])  # type: ignore[arg-type]
    assert second is not None and second.released is None
    last = _succeed(claims[2])  # type: ignore[arg-type]
    assert last is not None and (last.done, last.total, last.released) == (3, 3, Stage.EMBED)
    parent = _job(parent_id)
    assert (parent.state, parent.stage, parent.attempt, parent.published_at) == (
        JobState.QUEUED, Stage.EMBED, 0, None)
    assert _counts(parent_id) == (JobState.QUEUED, 3, 3, 0)
    with session_scope() as session:
        events = session.execute(
            select(JobEvent.state, JobEvent.stage, JobEvent.progress)
            .where(JobEvent.job_id == parent_id).order_by(JobEvent.id)).all()
    # queued → running → waiting → progress 1/3 → 2/3 → queued at embed, each recorded once
    share = ledger.PARTS_PROGRESS_SHARE
    assert [(e.state, e.stage) for e in events] == [
        ("queued", "parse"), ("running", "parse"), ("waiting", "parse"), ("waiting", "parse"),
        ("waiting", "parse"), ("queued", "embed")]
    assert [e.progress for e in events[2:]] == pytest.approx([0, share / 3, share * 2 / 3, share])
    # The parent now runs its next stage like any job.
    with session_scope() as session:
        assert ledger.start(session, job_id=parent_id, stage=Stage.EMBED, worker="w1",
                            stale_before=utcnow() - timedelta(seconds=60)) is not None


def test_a_part_taken_over_counts_once(any_db: dict[str, str]) -> None:
    parent_id, part_ids = _split(2)
    old = _start(part_ids[0])
    new = _start(part_ids[0], worker="w2", stale_s=-1)  # the first worker went silent
    assert old is not None and new is not None and new.attempt == 2
    assert _succeed(old) is None  # the old holder lost the part: its results roll back
    counted = _succeed(new)
    assert counted is not None and counted.done == 1
    assert _succeed(new) is None
    assert _counts(parent_id) == (JobState.WAITING, 2, 1, 0)


def test_failed_parts_fail_the_parent_and_replaying_them_lets_it_proceed(
    any_db: dict[str, str],
) -> None:
    parent_id, (good, bad, dying) = _split(3)
    claim = _start(good)
    assert claim is not None and _succeed(claim) is not None
    claim = _start(bad)
    assert claim is not None
    with session_scope() as session:
        assert ledger.fail(session, claim, code="garbage_text", message="noise on every line")
    assert _counts(parent_id) == (JobState.WAITING, 3, 1, 1)  # one part still to settle
    assert _exhaust(dying) == JobState.DEAD
    parent = _job(parent_id)
    assert (parent.state, parent.error_code) == (JobState.FAILED, ledger.PART_FAILED)
    assert parent.parts_done == 1 and parent.parts_failed == 2
    assert parent.error_message == (
        "2 of 3 parts failed: pages 11-20 (garbage_text: noise on every line); "
        "pages 21-30 (timeout: too slow)")
    doc = _document(parent_id)
    assert (doc.status, doc.error_code) == (DocumentStatus.FAILED, ledger.PART_FAILED)

    with session_scope() as session:
        assert not ledger.replay(session, job_id=parent_id)  # replay its parts instead
        assert ledger.replay(session, job_id=dying)  # the dead-letter replay
    parent = _job(parent_id)
    assert (parent.state, parent.error_code, parent.finished_at) == (JobState.WAITING, None, None)
    assert _counts(parent_id) == (JobState.WAITING, 3, 1, 1)
    assert _document(parent_id).status == DocumentStatus.PROCESSING
    claim = _start(dying)
    assert claim is not None
    last = _succeed(claim)
    # Done, but one part still failed: the parent fails again, for that part only.
    assert last is not None and last.released is None
    parent = _job(parent_id)
    assert (parent.state, parent.parts_done, parent.parts_failed) == (JobState.FAILED, 2, 1)
    assert parent.error_message == (
        "1 of 3 parts failed: pages 11-20 (garbage_text: noise on every line)")

    with session_scope() as session:
        assert ledger.replay(session, job_id=bad)
    claim = _start(bad)
    assert claim is not None
    last = _succeed(claim)
    assert last is not None and last.released == Stage.EMBED
    assert _counts(parent_id) == (JobState.QUEUED, 3, 3, 0)
    assert _job(parent_id).stage == Stage.EMBED


def test_the_counter_matches_the_parts_states(any_db: dict[str, str]) -> None:
    """Whatever happened, parts_done / parts_failed are the parts succeeded / ended badly."""
    parent_id, parts = _split(5)
    for part_id in parts[:2]:
        claim = _start(part_id)
        assert claim is not None and _succeed(claim) is not None
    _exhaust(parts[2])
    with session_scope() as session:
        ledger.replay(session, job_id=parts[2])
        ledger.cancel(session, job_id=parts[3])  # a part cancelled on its own
    _exhaust(parts[2])
    with session_scope() as session:
        by_state = dict(session.execute(
            select(Job.state, func.count()).where(Job.parent_id == parent_id)
            .group_by(Job.state)).all())
        parent = session.get_one(Job, parent_id)
        assert parent.parts_done == by_state.get(JobState.SUCCEEDED, 0) == 2
        assert parent.parts_failed == sum(by_state.get(s, 0) for s in ledger.SETTLED_FAILED) == 2
    assert _job(parent_id).state == JobState.WAITING  # parts[4] is still queued


def test_cancel_of_the_parent_cancels_its_parts_and_drops_chunks(any_db: dict[str, str]) -> None:
    parent_id, (done, running, queued, dead) = _split(4)
    document_id = _job(parent_id).document_id
    claim = _start(done)
    assert claim is not None
    with session_scope() as session:
        assert ledger.parent_waits(session, done)
        session.add(Chunk(workspace_id=WS, document_id=document_id, ord=0, text="kept?"))
        assert ledger.succeed_part(session, claim) is not None
    _exhaust(dead)
    running_claim = _start(running)
    assert running_claim is not None

    with session_scope() as session:
        assert ledger.cancel(session, job_id=parent_id) == JobState.CANCELLED
    states = {p: _job(p) for p in (done, running, queued, dead)}
    assert states[done].state == JobState.SUCCEEDED
    assert states[queued].state == JobState.CANCELLED
    assert states[dead].state == JobState.DEAD
    assert (states[running].state, states[running].cancel_requested) == (JobState.RUNNING, True)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Chunk)
                              .where(Chunk.document_id == document_id)) == 0
    assert _document(parent_id).error_code == "cancelled"

    # The running part finds its parent gone at its last transaction and stops as cancelled.
    with session_scope() as session:
        assert not ledger.parent_waits(session, running)
        assert ledger.succeed_part(session, running_claim) is None
        assert ledger.acknowledge_cancel(session, running_claim)
    with session_scope() as session:
        assert not ledger.replay(session, job_id=dead)  # nothing to replay it for
    assert _counts(parent_id) == (JobState.CANCELLED, 4, 1, 3)


def test_a_parent_that_was_asked_to_cancel_does_not_split(any_db: dict[str, str]) -> None:
    from api.deps import ensure_workspace

    with session_scope() as session:
        ensure_workspace(session, WS)
        job_id = ledger.create_job(session, workspace_id=WS, kind=JobKind.INGEST,
                                   stage=Stage.PARSE).id
    claim = _start(job_id)
    assert claim is not None
    with session_scope() as session:
        assert ledger.cancel(session, job_id=job_id) == JobState.RUNNING
        assert ledger.split(session, claim, parts=[{"label": "a"}, {"label": "b"}]) is None
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.parent_id == job_id)) == 0


def test_the_last_two_parts_race_on_postgres(pg_env: dict[str, str]) -> None:
    """Two sessions succeed the last two parts at once: the second blocks on the parent's
    row until the first commits, then counts on top of it; exactly one releases the parent."""
    parent_id, (first, second) = _split(2)
    claims = [_start(first, worker="a"), _start(second, worker="b")]
    assert all(claims)
    outcomes: dict[str, ledger.FanIn | None] = {}
    session_a = new_session()
    session_a.begin()
    outcomes["a"] = ledger.succeed_part(session_a, claims[0])  # type: ignore[arg-type]

    def other() -> None:
        outcomes["b"] = _succeed(claims[1])  # type: ignore[arg-type]

    racer = threading.Thread(target=other)
    racer.start()
    _wait_for_lock_wait()  # b is blocked on the parent's row, held by a
    session_a.commit()
    session_a.close()
    racer.join(timeout=60)
    assert not racer.is_alive()
    a, b = outcomes["a"], outcomes["b"]
    assert a is not None and b is not None
    assert (a.done, a.released) == (1, None)
    assert (b.done, b.released) == (2, Stage.EMBED)
    assert _counts(parent_id) == (JobState.QUEUED, 2, 2, 0)


def test_many_parts_finishing_together_release_once_on_postgres(pg_env: dict[str, str]) -> None:
    parent_id, part_ids = _split(8)
    claims = [_start(p, worker=f"w{i}") for i, p in enumerate(part_ids)]
    barrier = threading.Barrier(len(claims))
    outcomes: list[ledger.FanIn | None] = []
    lock = threading.Lock()

    def finish(claim: ledger.Claim) -> None:
        barrier.wait()
        result = _succeed(claim)
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=finish, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == 8 and all(o is not None for o in outcomes)
    assert sorted(o.done for o in outcomes) == list(range(1, 9))  # type: ignore[union-attr]
    assert [o.released for o in outcomes if o.released] == [Stage.EMBED]  # type: ignore[union-attr]
    assert _counts(parent_id) == (JobState.QUEUED, 8, 8, 0)
    with session_scope() as session:
        released = session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == parent_id, JobEvent.stage == Stage.EMBED))
    assert released == 1


def _wait_for_lock_wait(timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            waiting = session.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"))
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the second session never waited for the parent's row lock")


def test_a_part_whose_pages_are_not_in_the_pdf_fails_and_fails_its_parent(
    sluice_env: dict[str, str], data_dir: Path,
) -> None:
    """The real parse task, in-process: a part asking for pages 30-35 of a 28-page PDF fails
    permanently, counted on its parent, which fails with `part_failed`."""
    from tasks import ingest
    from tasks.runner import run_stage

    parent_id, (good, out_of_range) = _split(2)
    sha = _store_blob(PDF)
    document_id = _job(parent_id).document_id
    with session_scope() as session:
        session.get_one(Document, document_id).sha256 = sha
        for part_id, pages in ((good, PageRange(0, 27, 28)), (out_of_range, PageRange(1, 30, 35))):
            session.get_one(Job, part_id).payload = {
                "part": {"document_id": document_id, "index": pages.index,
                         "first": pages.first, "last": pages.last, "of": 2},
                "label": pages.label}
    outcomes = [run_stage(job_id=p, stage=Stage.PARSE, work=ingest._parse, worker="w1")
                for p in (good, out_of_range)]
    assert outcomes == [JobState.SUCCEEDED, JobState.FAILED]
    bad = _job(out_of_range)
    assert bad.error_code == "corrupt_document" and "28 pages" in (bad.error_message or "")
    parent = _job(parent_id)
    assert (parent.state, parent.error_code) == (JobState.FAILED, ledger.PART_FAILED)
    assert "pages 30-35 (corrupt_document" in (parent.error_message or "")
    with session_scope() as session:
        pages = session.scalars(select(Chunk.page).where(Chunk.document_id == document_id)).all()
    assert pages and set(pages) <= {27, 28}  # the good part's chunks are kept, pages true


def _store_blob(path: Path) -> str:
    import hashlib
    import shutil

    from sluice.blobs import BlobStore
    from sluice.settings import get_settings

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    target = BlobStore(get_settings().resolved_blob_dir).path_for(WS, sha)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return sha


def test_a_transient_failure_after_a_cancel_request_ends_cancelled(
    any_db: dict[str, str],
) -> None:
    """A part still running when its parent was cancelled, whose attempt then fails
    transiently (a lost database, a stale heartbeat), ends cancelled and counted: retrying,
    it would never start again, only be republished forever."""
    parent_id, (running, _queued) = _split(2)
    claim = _start(running)
    assert claim is not None
    with session_scope() as session:
        assert ledger.cancel(session, job_id=parent_id) == JobState.CANCELLED
        state = ledger.retry_or_bury(session, claim, max_retries=3, delay_s=0,
                                     code="database_unavailable", message="gone")
    assert state == JobState.CANCELLED
    assert (_job(running).state, _job(running).error_code) == (JobState.CANCELLED, "cancelled")
    assert _counts(parent_id) == (JobState.CANCELLED, 2, 0, 2)


def test_parts_through_the_api(sluice_env: dict[str, str]) -> None:
    """GET shows a parent's counters and lists its parts; a dead part replayed from the
    dead letters makes its failed parent wait again; deleting the document cancels all."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app()) as client:
        upload = client.post("/v1/documents", files={"file": ("big.txt", b"words " * 100)},
                             headers={"X-Workspace": WS}).json()
        parent_id, document_id = upload["job_id"], upload["document_id"]
        claim = _start(parent_id)
        assert claim is not None
        with session_scope() as session:
            good, dying, third = ledger.split(session, claim, parts=[  # type: ignore[misc]
                {"label": f"pages {i}"} for i in range(3)])
        headers = {"X-Workspace": WS}
        job = client.get(f"/v1/jobs/{parent_id}", headers=headers).json()
        assert (job["state"], job["parts"], job["parent_id"]) == (
            "waiting", {"total": 3, "done": 0, "failed": 0}, None)
        listed = client.get("/v1/jobs", params={"parent": parent_id}, headers=headers).json()
        assert sorted(p["id"] for p in listed) == sorted([good, dying, third])
        assert {(p["kind"], p["parent_id"], p["parts"]) for p in listed} == {
            ("ingest_part", parent_id, None)}

        claim = _start(good)
        assert claim is not None and _succeed(claim) is not None
        with session_scope() as session:
            ledger.cancel(session, job_id=third)
        _exhaust(dying)
        job = client.get(f"/v1/jobs/{parent_id}", headers=headers).json()
        assert (job["state"], job["error"]["code"], job["parts"]) == (
            "failed", "part_failed", {"total": 3, "done": 1, "failed": 2})
        assert client.get(f"/v1/documents/{document_id}", headers=headers).json()["job_id"] \
            == parent_id

        replayed = client.post(f"/v1/dead-letters/{dying}/replay", headers=headers).json()
        assert replayed["state"] == "queued"
        assert _job(dying).published_at is not None  # its message went out
        job = client.get(f"/v1/jobs/{parent_id}", headers=headers).json()
        assert (job["state"], job["error"], job["parts"]) == (
            "waiting", None, {"total": 3, "done": 1, "failed": 1})
        assert _document(parent_id).status == DocumentStatus.PROCESSING

        running = _start(dying)
        assert running is not None
        assert client.delete(f"/v1/documents/{document_id}", headers=headers).status_code == 204
    assert _job(parent_id).state == JobState.CANCELLED
    assert (_job(dying).state, _job(dying).cancel_requested) == (JobState.RUNNING, True)
    with session_scope() as session:
        assert not ledger.parent_waits(session, dying)  # its results will not be written
        assert ledger.acknowledge_cancel(session, running)
    assert _counts(parent_id) == (JobState.CANCELLED, 3, 1, 2)


def test_migration_0006_up_and_down_keeps_every_job_row(any_db: dict[str, str]) -> None:
    from sqlalchemy import inspect

    from sluice import migrate
    from sluice.db import dispose_engine, get_engine

    parent_id, _parts = _split(2)
    counts = (
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_attempts), "
        "(SELECT count(*) FROM job_events)")
    with session_scope() as session:
        before = tuple(session.execute(text(counts)).one())
    migrate.downgrade(get_engine(), "0005")
    dispose_engine()
    columns = {c["name"] for c in inspect(get_engine()).get_columns("jobs")}
    assert not columns & {"parent_id", "parts_total", "parts_done", "parts_failed"}
    migrate.upgrade(get_engine(), "0006")
    dispose_engine()
    assert "ix_jobs_parent_id" in {ix["name"] for ix in inspect(get_engine()).get_indexes("jobs")}
    with session_scope() as session:
        assert tuple(session.execute(text(counts)).one()) == before
        assert session.execute(text(
            "SELECT parent_id, parts_total, parts_done, parts_failed FROM jobs WHERE id = :id"),
            {"id": parent_id}).one() == (None, 0, 0, 0)  # the split's columns came back empty
