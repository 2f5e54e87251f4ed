"""Large PDFs in parts, through the real API and two real Celery worker processes: the page
ranges are parsed in parallel by both, the counter in the database releases the embed stage
once, the chunks are those of a whole-document parse; a range that fails permanently fails the
document with `part_failed` and keeps the other ranges' chunks; a cancel stops every part."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from models import Chunk, Document, Job, JobAttempt, JobEvent
from sluice.db import session_scope
from tests.conftest import DATA
from tests.stack import StackFactory

pytestmark = pytest.mark.integration

FILINGS = DATA / "qa" / "docugami-sec-10-q" / "data" / "v1" / "docs"
PDF = FILINGS / "2022 Q3 AAPL.pdf"  # 28 pages; the CFO's certification is on the last two
PART_PAGES = 7


@pytest.fixture(params=["embedded", "postgres+redis"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    name = "sluice_env" if request.param == "embedded" else "production_env"
    result: dict[str, str] = request.getfixturevalue(name)
    return {**result, "SLUICE_PDF_PART_PAGES": str(PART_PAGES)}


def test_a_large_pdf_is_parsed_in_parts_by_both_workers(
    env: dict[str, str], stack: StackFactory, data_dir: Path
) -> None:
    s = stack(env, workers=2, concurrency=1)
    upload = s.upload(PDF).json()
    parent_id, document_id = upload["job_id"], upload["document_id"]
    job = s.wait_jobs([parent_id], timeout=600)[parent_id]
    assert job["state"] == "succeeded", (job, s.logs())
    assert job["parts"] == {"total": 4, "done": 4, "failed": 0}

    with s.client() as client:
        parts = client.get("/v1/jobs", params={"parent": parent_id}).json()
    assert len(parts) == 4
    assert {(p["kind"], p["state"], p["parent_id"]) for p in parts} == {
        ("ingest_part", "succeeded", parent_id)}
    assert sorted(p["result"]["pages"] for p in parts) == [[1, 7], [8, 14], [15, 21], [22, 28]]

    with session_scope() as session:
        workers = set(session.scalars(
            select(JobAttempt.worker).join(Job, Job.id == JobAttempt.job_id)
            .where(Job.parent_id == parent_id)))
        assert len(workers) == 2, workers  # both worker processes parsed page ranges
        doc = session.get_one(Document, document_id)
        assert (doc.status, doc.page_count) == ("ready", 28)
        chunks = session.scalars(select(Chunk).where(Chunk.document_id == document_id)
                                 .order_by(Chunk.ord)).all()
        assert doc.chunk_count == len(chunks)
        assert all(c.embedding is not None for c in chunks)
        progress = session.scalars(
            select(JobEvent.progress).where(JobEvent.job_id == parent_id,
                                            JobEvent.state == "waiting")
            .order_by(JobEvent.id)).all()
    assert progress == sorted(progress) and len(progress) == 4  # parked, then 1/4 .. 3/4

    # The same chunks, page for page, as a whole-document parse would have made.
    whole = _whole_document_chunks(env)
    assert {c.page for c in chunks} == {c.page for c in whole} == set(range(1, 29))
    assert _words(c.text for c in chunks) == _words(c.text for c in whole)

    with s.client() as client:
        hits = client.post("/v1/search", json={
            "query": "Luca Maestri Senior Vice President, Chief Financial Officer certification",
            "top_k": 3}).json()["results"]
        assert hits and hits[0]["document_id"] == document_id
        assert hits[0]["page"] >= 22, hits  # from the last part
        resp = client.post("/v1/answers", params={"wait": 120},
                           json={"question": "Who is Apple's Chief Financial Officer?"})
        result = resp.json()["result"]
        assert result["answered"] and "Luca Maestri" in result["answer"], result
        assert any(c["page"] >= 22 for c in result["citations"])


def test_a_failing_range_fails_the_document_and_a_cancel_stops_every_part(
    sluice_env: dict[str, str], stack: StackFactory, tmp_path: Path, data_dir: Path
) -> None:
    s = stack({**sluice_env, "SLUICE_PDF_PART_PAGES": str(PART_PAGES)}, workers=2,
              concurrency=1)
    noisy = _with_noise_pages(PDF, tmp_path / "aapl-with-noise.pdf", pages=3)  # 31 pages
    upload = s.upload(noisy).json()
    parent_id, document_id = upload["job_id"], upload["document_id"]
    job = s.wait_jobs([parent_id], timeout=600)[parent_id]
    assert (job["state"], job["error"]["code"]) == ("failed", "part_failed"), (job, s.logs())
    assert job["parts"] == {"total": 5, "done": 4, "failed": 1}
    assert job["error"]["message"].startswith("1 of 5 parts failed: pages 29-31 (garbage_text")
    with s.client() as client:
        parts = client.get("/v1/jobs", params={"parent": parent_id}).json()
        doc = client.get(f"/v1/documents/{document_id}").json()
    assert sorted((p["state"], p["error"] and p["error"]["code"]) for p in parts) == [
        ("failed", "garbage_text"), *[("succeeded", None)] * 4]
    assert (doc["status"], doc["error"]["code"], doc["job_id"]) == (
        "failed", "part_failed", parent_id)
    with session_scope() as session:
        pages = set(session.scalars(select(Chunk.page).where(Chunk.document_id == document_id)))
    assert pages == set(range(1, 29))  # the good ranges' chunks are kept

    # A cancel while the parts run stops them all and leaves no chunk behind.
    other = FILINGS / "2022 Q3 MSFT.pdf"  # 80 pages: 12 parts for two workers
    upload = s.upload(other).json()
    parent_id, document_id = upload["job_id"], upload["document_id"]
    _wait_until(lambda: _job(parent_id).state == "waiting" and _job(parent_id).parts_done > 0,
                s.logs)
    with s.client() as client:
        assert client.post(f"/v1/jobs/{parent_id}/cancel").json()["state"] == "cancelled"
        with session_scope() as session:
            part_ids = list(session.scalars(select(Job.id).where(Job.parent_id == parent_id)))
        finals = s.wait_jobs(part_ids, timeout=300)
    states = [f["state"] for f in finals.values()]
    assert "cancelled" in states and set(states) <= {"cancelled", "succeeded"}, states
    parent = _job(parent_id)
    assert parent.state == "cancelled"
    assert parent.parts_done + parent.parts_failed == parent.parts_total == 12
    with session_scope() as session:
        assert session.scalars(select(Chunk.id).where(Chunk.document_id == document_id)).all() == []
        assert session.get_one(Document, document_id).error_code == "cancelled"


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def _wait_until(condition: object, logs: object, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met after {timeout}s\n{logs()}")  # type: ignore[operator]


def _whole_document_chunks(env: dict[str, str]) -> list[object]:
    from pipelines.chunking import chunk_elements
    from pipelines.parsing import parse_document
    from sluice.settings import get_settings

    settings = get_settings()
    tagger = env.get("SLUICE_TAGGER_PATH")
    parsed = parse_document(PDF, filename=PDF.name, pdf_strategy=settings.pdf_strategy,
                            tagger_path=Path(tagger) if tagger else None)
    return chunk_elements(parsed.elements, max_words=settings.chunk_max_words)  # type: ignore[return-value]


def _words(texts: object) -> int:
    return sum(len(t.split()) for t in texts)  # type: ignore[attr-defined]


def _with_noise_pages(source: Path, target: Path, *, pages: int) -> Path:
    """`source` with `pages` pages of symbol noise appended: text a PDF can really hold (a font
    without a text mapping yields the like), which the parser's garbage check refuses."""
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import DictionaryObject, NameObject, StreamObject

    reader = PdfReader(source)
    reader.decrypt("")  # only an owner password
    writer = PdfWriter()
    writer.append(reader)
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    rng = random.Random(7)
    for _ in range(pages):
        page = writer.add_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject({
            NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        lines = ["".join(rng.choice("#%&*+=~^|<>/-_") for _ in range(70)) for _ in range(40)]
        ops = ["BT", "/F1 11 Tf", "14 TL", "72 740 Td", *(f"({line}) Tj T*" for line in lines),
               "ET"]
        content = StreamObject()
        content.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(content)
    with target.open("wb") as handle:
        writer.write(handle)
    return target
