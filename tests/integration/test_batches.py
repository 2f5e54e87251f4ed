"""Stages that write in batches, with real worker processes: large plain text is chunked as a
stream into the database; embedding runs in slices that requeue themselves and pick up where
the last one stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Chunk, Document, Job, JobAttempt
from pipelines.textstream import chunk_file
from sluice.db import session_scope
from tests.faults.harness import SCIFACT
from tests.stack import StackFactory

pytestmark = pytest.mark.integration


def _abstracts_file(path: Path, count: int) -> Path:
    with SCIFACT.open() as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(count), fh, strict=False)]
    path.write_text("\n\n".join(texts) + "\n")
    return path


def test_large_text_is_chunked_as_a_stream(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    # Slices end after every 1 MiB block: the ~3 MB file is parsed in several deliveries.
    s = stack({**sluice_env, "SLUICE_STREAM_TEXT_OVER_BYTES": "1024",
               "SLUICE_TEXT_SLICE_S": "0.001"}, queues="parse")
    path = _abstracts_file(tmp_path / "abstracts.txt", 2500)  # ~3 MB, ~2,800 chunks
    upload = s.upload(path).json()
    deadline = time.monotonic() + 300
    while True:
        with session_scope() as session:
            job = session.get_one(Job, upload["job_id"])
            if (job.stage, job.state) == ("embed", "queued"):
                break
            assert job.state not in ("failed", "dead"), (job.error_code, job.error_message)
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.3)
    expected = [c.text for c in chunk_file(path, encoding="utf-8", max_words=160)]
    assert len(expected) > 2000  # more than one insert batch
    with session_scope() as session:
        rows = session.execute(select(Chunk.ord, Chunk.text)
                               .where(Chunk.document_id == upload["document_id"])
                               .order_by(Chunk.ord)).all()
        doc = session.get_one(Document, upload["document_id"])
        job = session.get_one(Job, upload["job_id"])
        slices = session.execute(select(JobAttempt.outcome).where(
            JobAttempt.job_id == upload["job_id"], JobAttempt.stage == "parse")).scalars().all()
        assert doc.chunk_count == len(rows)
        assert doc.content_type == "text/plain; charset=utf-8"
        assert "text_resume" not in job.payload  # the resume point is gone once done
    assert len(slices) >= 3 and set(slices) == {"succeeded"}
    assert [r.ord for r in rows] == list(range(len(rows)))
    # A chunk never spans two slices, so a slice boundary may cut a packed chunk in two; the
    # text is the file's, every word once, in order.
    assert len(expected) <= len(rows) <= len(expected) + len(slices)
    assert " ".join(r.text for r in rows).split() == " ".join(expected).split()


def test_embedding_runs_in_slices_that_resume(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path
) -> None:
    env = {**sluice_env, "SLUICE_EMBED_SLICE_S": "0.5"}  # every slice is one batch long
    s = stack(env, concurrency=1)
    upload = s.upload(_abstracts_file(tmp_path / "abstracts.txt", 300)).json()
    final = s.wait_jobs([upload["job_id"]], timeout=600)[upload["job_id"]]
    assert final["state"] == "succeeded", final
    with session_scope() as session:
        chunks = session.scalar(select(func.count()).select_from(Chunk)
                                .where(Chunk.document_id == upload["document_id"]))
        embedded = session.scalar(select(func.count()).select_from(Chunk)
                                  .where(Chunk.document_id == upload["document_id"],
                                         Chunk.embedding.is_not(None)))
        slices = session.execute(select(JobAttempt.outcome, JobAttempt.error_code)
                                 .where(JobAttempt.job_id == upload["job_id"],
                                        JobAttempt.stage == "embed")).all()
    assert chunks is not None and chunks > 256  # at least two batches of 256
    assert embedded == chunks
    # Each slice but the last wrote a full batch and requeued the stage; none failed. Had a
    # slice not skipped the chunks embedded before it, the job would never have finished.
    assert len(slices) >= 2
    assert {outcome for outcome, _ in slices} == {"succeeded"}
    with s.client() as client:
        hits = client.post("/v1/search", json={"query": "alveolar macrophages", "top_k": 3})
        assert hits.status_code == 200 and hits.json()["results"], hits.text
