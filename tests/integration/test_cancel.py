"""Cancelling a running ingest with a real worker: it stops at its next checkpoint and leaves
no chunks behind; a queued job never starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Chunk, Document, Job, JobAttempt
from sluice.db import session_scope
from tests.faults.harness import SCIFACT
from tests.stack import StackFactory

pytestmark = pytest.mark.integration


def _long_text(path: Path, paragraphs: int) -> Path:
    import json

    lines = []
    with SCIFACT.open() as fh:
        for line in fh:
            lines.append(json.loads(line)["text"])
            if len(lines) == paragraphs:
                break
    path.write_text("\n\n".join(lines))
    return path


def test_cancel_running_embed_leaves_nothing(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path, data_dir: Path
) -> None:
    s = stack({**sluice_env, "SLUICE_HEARTBEAT_INTERVAL_S": "0.3"}, concurrency=1)
    big = _long_text(tmp_path / "long.txt", 1500)  # ~1,500 chunks: many embedding batches
    upload = s.upload(big).json()
    job_id, doc_id = upload["job_id"], upload["document_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.get_one(Job, job_id)
            if job.stage == "embed" and job.state == "running":
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"never started embedding: {s.logs()}")
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Chunk)
                              .where(Chunk.document_id == doc_id)) > 0  # parsed chunks exist
    with s.client() as client:
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "running"
    final = s.wait_jobs([job_id], timeout=120)[job_id]
    assert final["state"] == "cancelled", final
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Chunk)
                              .where(Chunk.document_id == doc_id)) == 0
        doc = session.get_one(Document, doc_id)
        assert (doc.status, doc.error_code) == ("failed", "cancelled")
        outcomes = session.scalars(select(JobAttempt.outcome)
                                   .where(JobAttempt.job_id == job_id)).all()
        assert outcomes == ["succeeded", "cancelled"]  # parse done, embed stopped
