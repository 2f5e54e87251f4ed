"""Upload → parse → chunk → embed → index → cited answer, through the real API and real
Celery worker processes, on the embedded default and on PostgreSQL (pgvector) + Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from models import Chunk, Document
from sluice.db import session_scope
from tests.conftest import DATA
from tests.stack import StackFactory

pytestmark = pytest.mark.integration

DOCS = DATA / "docs" / "unstructured"
PDF = DOCS / "pdf" / "layout-parser-paper-fast.pdf"
DOCX = DOCS / "handbook-1p.docx"
HTML = DOCS / "example-10k-1p.html"


@pytest.fixture(params=["embedded", "postgres+redis"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    name = "sluice_env" if request.param == "embedded" else "production_env"
    result: dict[str, str] = request.getfixturevalue(name)
    return result


def test_ingest_three_formats_then_answer_with_citation(
    env: dict[str, str], stack: StackFactory, data_dir: Path
) -> None:
    s = stack(env)
    uploads = {path.name: s.upload(path).json() for path in (PDF, DOCX, HTML)}
    states = s.wait_jobs([u["job_id"] for u in uploads.values()], timeout=300)
    for name, upload in uploads.items():
        job = states[upload["job_id"]]
        assert job["state"] == "succeeded", (name, job, s.logs())
        assert job["result"]["chunks"] > 0

    with session_scope() as session:
        for name, upload in uploads.items():
            doc = session.get_one(Document, upload["document_id"])
            assert doc.status == "ready", name
            chunks = session.scalars(select(Chunk).where(Chunk.document_id == doc.id)).all()
            assert chunks and all(c.embedding is not None for c in chunks), name
            assert all(c.embedding_model == "all-MiniLM-L6-v2" for c in chunks)
        pdf_pages = session.scalars(
            select(Chunk.page).where(Chunk.document_id == uploads[PDF.name]["document_id"])
        ).all()
        assert set(pdf_pages) == {1, 2}
        if session.get_bind().dialect.name == "postgresql":
            # the query plan of a dense search uses the HNSW index
            assert session.scalar(text(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_chunks_embedding_hnsw'"
            )) == 1

    with s.client() as client:
        resp = client.post("/v1/answers", params={"wait": 120}, json={
            "question": "Which deep learning frameworks are existing models developed with?",
            "top_k": 5,
        })
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["state"] == "succeeded", (job["error"], s.logs())
        result = job["result"]
        assert result["answered"] is True
        assert "TensorFlow" in result["answer"]
        cited = [(c["document_id"], c["page"]) for c in result["citations"]]
        assert (uploads[PDF.name]["document_id"], 2) in cited
        first = result["citations"][0]
        assert {"document_id", "filename", "page", "chunk_id", "score"} <= set(first)

        resp = client.post("/v1/answers", params={"wait": 120}, json={
            "question": "Who appoints and supervises standing trustees?"})
        result = resp.json()["result"]
        assert result["answered"] and "United States Trustee" in result["answer"]
        assert result["citations"][0]["document_id"] == uploads[DOCX.name]["document_id"]

        # A question the documents do not answer is not guessed at.
        resp = client.post("/v1/answers", params={"wait": 120}, json={
            "question": "What is the boiling point of liquid nitrogen in Kelvin?"})
        assert resp.json()["result"]["answered"] is False

        hits = client.post("/v1/search", json={"query": "LayoutParser toolkit", "top_k": 3})
        assert hits.status_code == 200
        assert hits.json()["results"][0]["document_id"] == uploads[PDF.name]["document_id"]

        # Search is scoped to the workspace: another workspace sees nothing.
        with s.client("elsewhere") as other:
            assert other.post("/v1/search", json={"query": "LayoutParser"}).json()["results"] == []
            resp = other.post("/v1/answers", params={"wait": 60},
                              json={"question": "What is LayoutParser?"})
            assert resp.json()["result"]["answered"] is False

    # Re-running ingest of identical bytes with force does not duplicate anything.
    with session_scope() as session:
        before = session.scalar(select(func.count()).select_from(Chunk))
    assert s.upload(PDF).json()["duplicate"] is True
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Chunk)) == before
