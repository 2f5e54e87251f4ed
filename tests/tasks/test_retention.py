"""Retention on SQLite and PostgreSQL: what is purged (expired finished jobs with their
attempts and events, expired idempotency records, orphaned blobs) and what never is (live
jobs, dead letters within their retention, a document's ingest job, blobs in use or fresh)."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from models import Document, Job, JobAttempt, JobEvent, JobKind, JobState, Stage, Workspace, locks
from models.entities import IdempotencyRecord, utcnow
from sluice.blobs import BlobStore
from sluice.db import session_scope
from sluice.settings import Settings, get_settings
from tasks import names, retention
from tasks.maintenance import purge_expired
from workers import resources

DAY = timedelta(days=1)


def _settings(**overrides: Any) -> Settings:
    return get_settings().model_copy(update={"purge_batch_size": 2, **overrides})


def _workspace(session: Any, name: str = "ws") -> None:
    if session.get(Workspace, name) is None:
        session.add(Workspace(id=name))
        session.flush()


def _document(sha: str = "a" * 64, workspace: str = "ws") -> str:
    with session_scope() as session:
        _workspace(session, workspace)
        doc = Document(workspace_id=workspace, filename="f.txt", sha256=sha, size_bytes=1,
                       status="ready")
        session.add(doc)
        session.flush()
        return doc.id


def _job(state: JobState, *, age: timedelta, kind: JobKind = JobKind.ANSWER,
         document_id: str | None = None) -> str:
    """A job in `state` last changed `age` ago, with one attempt and one event."""
    at = utcnow() - age
    final = state in (JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED)
    with session_scope() as session:
        _workspace(session)
        job = Job(workspace_id="ws", kind=kind, stage=Stage.ANSWER if kind == JobKind.ANSWER
                  else Stage.EMBED, state=state, document_id=document_id, attempt=1,
                  attempts_total=1, created_at=at, updated_at=at,
                  finished_at=at if final else None)
        session.add(job)
        session.flush()
        session.add(JobAttempt(job_id=job.id, workspace_id="ws", stage=job.stage, attempt=1,
                               started_at=at, ended_at=at if final else None))
        session.add(JobEvent(job_id=job.id, workspace_id="ws", kind=kind, state=state,
                             stage=job.stage, created_at=at))
        return job.id


def _idempotency(key: str, age: timedelta) -> None:
    with session_scope() as session:
        _workspace(session)
        session.add(IdempotencyRecord(workspace_id="ws", key=key, fingerprint="f",
                                      status_code=202, body="{}", created_at=utcnow() - age))


def _existing(model: Any, column: Any, ids: list[str]) -> set[str]:
    with session_scope() as session:
        return set(session.scalars(select(column).where(column.in_(ids))))


def _count(model: Any) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_purges_expired_finished_jobs_and_keys_and_nothing_else(any_db: dict[str, str]) -> None:
    live_doc = _document()
    purged = {
        "old succeeded answer": _job(JobState.SUCCEEDED, age=40 * DAY),
        "old cancelled answer": _job(JobState.CANCELLED, age=31 * DAY),
        "old ingest of a deleted document": _job(JobState.SUCCEEDED, age=40 * DAY,
                                                 kind=JobKind.INGEST),
        "dead letter past its retention": _job(JobState.DEAD, age=100 * DAY),
        "failed past the dead-letter retention": _job(JobState.FAILED, age=100 * DAY),
    }
    kept = {
        "recent succeeded answer": _job(JobState.SUCCEEDED, age=10 * DAY),
        "old ingest of a live document": _job(JobState.SUCCEEDED, age=400 * DAY,
                                              kind=JobKind.INGEST, document_id=live_doc),
        "dead letter still in the store": _job(JobState.DEAD, age=40 * DAY),
        "failed within the dead-letter retention": _job(JobState.FAILED, age=40 * DAY),
        "queued long ago": _job(JobState.QUEUED, age=400 * DAY),
        "running long ago": _job(JobState.RUNNING, age=400 * DAY),
        "retrying long ago": _job(JobState.RETRYING, age=400 * DAY),
    }
    _idempotency("old", 25 * timedelta(hours=1))
    _idempotency("fresh", timedelta(hours=1))
    all_ids = [*purged.values(), *kept.values()]

    result = retention.purge_expired(settings=_settings(), blobs=BlobStore(Path("/nonexistent")))

    assert result == {"jobs": 3, "dead_jobs": 2, "idempotency_keys": 1, "blobs": 0,
                      "incoming": 0}
    assert _existing(Job, Job.id, all_ids) == set(kept.values())
    assert _existing(JobAttempt, JobAttempt.job_id, all_ids) == set(kept.values())
    assert _existing(JobEvent, JobEvent.job_id, all_ids) == set(kept.values())
    with session_scope() as session:
        assert set(session.scalars(select(IdempotencyRecord.key))) == {"fresh"}
        assert session.get(Document, live_doc) is not None  # documents are never purged

    again = retention.purge_expired(settings=_settings(), blobs=BlobStore(Path("/nonexistent")))
    assert not any(again.values())  # idempotent


@pytest.mark.parametrize("off", [0, None])
def test_zero_or_none_keeps_everything(any_db: dict[str, str], off: float | None) -> None:
    jobs = [_job(JobState.SUCCEEDED, age=400 * DAY), _job(JobState.DEAD, age=400 * DAY)]
    _idempotency("old", 400 * DAY)
    settings = _settings(job_retention_days=off, dead_letter_retention_days=off,
                         idempotency_key_retention_hours=off, orphan_blob_grace_hours=off)
    assert not any(retention.purge_expired(settings=settings,
                                           blobs=BlobStore(Path("/nonexistent"))).values())
    assert _existing(Job, Job.id, jobs) == set(jobs)
    assert _count(IdempotencyRecord) == 1


def test_the_beat_task_runs_under_its_lease_and_records_the_run(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "blob_store", lru_cache(maxsize=1)(
        lambda: BlobStore(get_settings().resolved_blob_dir)))
    orphan = _blob(resources.blob_store(), _sha("9"), age=2 * DAY)
    old = _job(JobState.SUCCEEDED, age=40 * DAY)
    result = purge_expired()
    assert (result["jobs"], result["blobs"]) == (1, 1)
    assert _existing(Job, Job.id, [old]) == set() and not orphan.exists()
    with session_scope() as session:
        assert locks.last_result(session, names.PURGE_EXPIRED) == result
    assert not any(purge_expired().values())


# Orphaned blobs ----------------------------------------------------------------------------


def _blob(store: BlobStore, sha: str, *, age: timedelta, workspace: str = "ws") -> Path:
    path = store.path_for(workspace, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"bytes of " + sha.encode())
    _age(path, age)
    return path


def _age(path: Path, age: timedelta) -> None:
    stamp = (utcnow() - age).timestamp()
    os.utime(path, (stamp, stamp))


def _sha(c: str) -> str:
    return c * 64


def test_orphaned_blobs_past_the_grace_period_go_and_nothing_else(
    any_db: dict[str, str], tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    referenced_old = _blob(store, _sha("a"), age=30 * DAY)
    _document(_sha("a"))
    orphan_old = _blob(store, _sha("b"), age=2 * DAY)
    orphan_fresh = _blob(store, _sha("c"), age=timedelta(minutes=5))  # an upload in flight
    other_workspace = _blob(store, _sha("a"), age=30 * DAY, workspace="other")  # no document
    incoming = store.root / ".incoming"
    incoming.mkdir(parents=True)
    (abandoned := incoming / "tmpabandoned").write_bytes(b"x")
    _age(abandoned, 2 * DAY)
    (uploading := incoming / "tmpuploading").write_bytes(b"x")
    not_ours = store.root / "ws" / "notes.txt"
    not_ours.write_text("operator's file")
    _age(not_ours, 30 * DAY)

    result = retention.purge_expired(settings=_settings(orphan_blob_grace_hours=24),
                                     blobs=store)

    assert (result["blobs"], result["incoming"]) == (2, 1)
    assert referenced_old.exists() and orphan_fresh.exists() and uploading.exists()
    assert not orphan_old.exists() and not other_workspace.exists() and not abandoned.exists()
    assert not_ours.exists()
    assert [p.name for p in store.root.rglob("*.purging-*")] == []


def test_a_blob_that_gains_a_document_or_is_rewritten_meanwhile_is_put_back(
    any_db: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the first look (no document) and the rename aside, an upload commits its
    document for one blob and rewrites the other (an upload of the same bytes in flight)."""
    store = BlobStore(tmp_path / "blobs")
    committed = _blob(store, _sha("d"), age=2 * DAY)
    rewritten = _blob(store, _sha("e"), age=2 * DAY)
    real = retention.retention.referenced_blobs
    calls: list[int] = []

    def racing(session: Any, *, workspace_id: str, sha256s: Any) -> set[str]:
        found = real(session, workspace_id=workspace_id, sha256s=sha256s)
        if not calls:
            _document(_sha("d"))
            rewritten.write_bytes(b"bytes of " + _sha("e").encode())  # fresh mtime
        calls.append(1)
        return found

    monkeypatch.setattr(retention.retention, "referenced_blobs", racing)
    deleted, _ = retention.purge_orphan_blobs(store, older_than=utcnow() - DAY, batch=10)
    assert deleted == 0
    assert committed.exists() and rewritten.exists()
    assert [p.name for p in store.root.rglob("*.purging-*")] == []


def test_blobs_left_aside_by_an_interrupted_run_are_settled(
    any_db: dict[str, str], tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    used = _blob(store, _sha("f"), age=2 * DAY)
    _document(_sha("f"))
    unused = _blob(store, _sha("0"), age=2 * DAY)
    used_aside = used.rename(used.with_name(used.name + retention.PURGING + "dead0001"))
    unused_aside = unused.rename(unused.with_name(unused.name + retention.PURGING + "dead0002"))

    deleted, _ = retention.purge_orphan_blobs(store, older_than=utcnow() - DAY, batch=10)
    assert deleted == 1
    assert used.exists() and not used_aside.exists()
    assert not unused.exists() and not unused_aside.exists()


