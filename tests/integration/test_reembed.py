"""The re-embed sweep, on SQLite (sqlite-vec) and PostgreSQL (pgvector), with the real model.

The configured model version changes (the weights are pointed at under another name: a new
`embedding_version`), the sweep runs in batches, and searches answer correctly before, during
(from a reader running concurrently with the sweep) and after; no document is ever searched
with vectors of two versions; every chunk ends on the new version with the new model's
vectors; an interrupted sweep resumes; a sweep with nothing to do does nothing.

The stored "old" vectors are the model's vectors slightly perturbed, standing in for another
model's (close, as a new version of one model is), so the test can tell re-embedded vectors
from old ones.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from models import Chunk, Document, Workspace, reembed
from pipelines.embedding import Embedder, default_model_path
from pipelines.query_encoder import NumpyQueryEncoder
from sluice.db import read_scope, session_scope
from sluice.retrieve import hybrid_search
from sluice.settings import get_settings
from tasks import maintenance
from tasks.reembed import reembed_outdated
from tests.stack import StackFactory
from workers import resources

CORPUS = {
    "volcanoes.txt": [
        "Volcanoes erupt when magma from the mantle rises through cracks in the crust.",
        "Lava flows from basaltic volcanoes are runny and travel far from the vent.",
        "Explosive eruptions throw ash and pumice high into the stratosphere.",
    ],
    "sourdough.txt": [
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria in flour.",
        "Feed the starter with equal weights of flour and water every day.",
        "Bake the sourdough loaf in a preheated Dutch oven for a crisp crust.",
    ],
    "chess.txt": [
        "In chess the bishop moves diagonally any number of squares.",
        "Castling moves the king two squares towards a rook, which jumps over it.",
        "A pawn reaching the last rank is promoted, usually to a queen.",
    ],
    "tides.txt": [
        "Ocean tides are caused by the gravitational pull of the moon and the sun.",
        "Spring tides occur at new and full moon, when the pulls line up.",
        "Neap tides, with the smallest range, come at the quarter moons.",
    ],
    "bees.txt": [
        "Honey bees communicate the direction of flowers with a waggle dance.",
        "Worker bees build hexagonal wax cells to store honey and pollen.",
        "The queen bee lays up to two thousand eggs a day in spring.",
    ],
}
QUESTIONS = {
    "How does a pawn get promoted to a queen?": "chess.txt",
    "What makes lava flow far from a volcano vent?": "volcanoes.txt",
    "How often should I feed my sourdough starter flour and water?": "sourdough.txt",
    "Why do spring tides happen at full moon?": "tides.txt",
    "How do honey bees tell each other where flowers are?": "bees.txt",
}
OLD_VERSION = "all-MiniLM-L6-v2@0.1.0"


@pytest.fixture(scope="module")
def old_model() -> Embedder:
    return Embedder.default(batch_size=16)


@pytest.fixture
def new_model_dir(tmp_path: Path) -> Path:
    """The same weights under another name: the configured model becomes a new version."""
    source = Path(default_model_path())
    target = tmp_path / "minilm-l6-v2-retrained"
    target.mkdir()
    for entry in source.iterdir():
        (target / entry.name).symlink_to(entry)
    return target


def _seed(old_model: Embedder) -> dict[str, str]:
    """The corpus as ingest would leave it, embedded by the old version; filename → id."""
    rng = np.random.default_rng(7)
    ids: dict[str, str] = {}
    with session_scope() as session:
        session.add(Workspace(id="ws"))
        session.flush()
        for filename, texts in CORPUS.items():
            doc = Document(workspace_id="ws", filename=filename, sha256="0" * 64, size_bytes=1,
                           status="ready", chunk_count=len(texts))
            session.add(doc)
            session.flush()
            ids[filename] = doc.id
            for order, (text, vector) in enumerate(
                    zip(texts, old_model.encode(texts), strict=True)):
                old = vector + rng.normal(0, 0.01, vector.shape).astype(np.float32)
                session.add(Chunk(workspace_id="ws", document_id=doc.id, ord=order, text=text,
                                  meta={}, embedding=old / np.linalg.norm(old),
                                  embedding_model="all-MiniLM-L6-v2",
                                  embedding_version=OLD_VERSION))
    return ids


def _configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    monkeypatch.setattr(resources, "_embedder", None)


def _check_searches(ids: dict[str, str], encoders: list[Any]) -> None:
    """Every question's best passage, dense and hybrid, is from the right document."""
    by_id = {v: k for k, v in ids.items()}
    with read_scope() as session:
        for encode in encoders:
            for question, filename in QUESTIONS.items():
                for mode in ("dense", "hybrid"):
                    top = hybrid_search(session, workspace_id="ws", query=question,
                                        encode_query=encode, top_k=3, mode=mode)
                    assert top, (question, mode)
                    assert by_id[top[0].document_id] == filename, (question, mode, top[0])


def _mixed_documents() -> list[str]:
    """Documents whose chunks are on more than one version (one snapshot)."""
    with read_scope() as session:
        return list(session.scalars(
            select(Chunk.document_id).group_by(Chunk.document_id)
            .having(func.count(func.distinct(Chunk.embedding_version)) > 1)))


def _versions() -> dict[str, set[tuple[str | None, str | None]]]:
    with read_scope() as session:
        rows = session.execute(select(Chunk.document_id, Chunk.embedding_model,
                                      Chunk.embedding_version))
        out: dict[str, set[tuple[str | None, str | None]]] = {}
        for r in rows:
            out.setdefault(r.document_id, set()).add((r.embedding_model, r.embedding_version))
        return out


class Reader:
    """Searches continuously from another thread (while the sweep runs), checking every
    answer and that no document is on two versions in any snapshot it reads."""

    def __init__(self, ids: dict[str, str], encode: Any) -> None:
        self.ids, self.encode = ids, encode
        self.rounds = 0
        self.failures: list[AssertionError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            last = self._stop.is_set()  # a final round reads the state after the sweep
            try:
                mixed = _mixed_documents()
                assert not mixed, f"documents on two versions at once: {mixed}"
                _check_searches(self.ids, [self.encode])
            except AssertionError as exc:
                self.failures.append(exc)
                return
            self.rounds += 1
            if last:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
        assert not self._thread.is_alive()


def test_model_version_change_is_swept_while_searches_keep_answering(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch, old_model: Embedder,
    new_model_dir: Path,
) -> None:
    ids = _seed(old_model)
    _check_searches(ids, [lambda q: old_model.encode([q])[0]])
    with session_scope() as session:  # a document still being ingested is left to its stage
        session.add(Document(id="in-flight", workspace_id="ws", filename="new.txt",
                             sha256="1" * 64, size_bytes=1, status="processing"))
        session.flush()
        session.add(Chunk(workspace_id="ws", document_id="in-flight", ord=0, text="pending",
                          meta={}, embedding=np.eye(384, dtype=np.float32)[0],
                          embedding_model="all-MiniLM-L6-v2", embedding_version=OLD_VERSION))

    # The operator changes the model; each sweep run does one document (3 chunks).
    _configure(monkeypatch, SLUICE_EMBEDDING_MODEL_PATH=str(new_model_dir),
               SLUICE_REEMBED_CHUNKS_PER_RUN="3")
    new = resources.embedder()
    assert new.model_version != OLD_VERSION and new.model_name == "minilm-l6-v2-retrained"
    api_encoder = NumpyQueryEncoder(new_model_dir)  # what the API encodes queries with
    reader = Reader(ids, api_encoder.encode_one)

    runs = []
    while True:
        result = maintenance.reembed_outdated_chunks()
        runs.append(result)
        assert not _mixed_documents()
        _check_searches(ids, [api_encoder.encode_one, lambda q: new.encode([q])[0]])
        if result["documents"] == 0:
            break
    assert [r["documents"] for r in runs] == [1, 1, 1, 1, 1, 0]
    assert [r["remaining"] for r in runs] == [12, 9, 6, 3, 0, 0]
    assert all(r["version"] == new.model_version for r in runs)

    reader.stop()
    assert reader.failures == [] and reader.rounds >= 2
    versions = _versions()
    for doc_id in ids.values():
        assert versions[doc_id] == {(new.model_name, new.model_version)}
    assert versions["in-flight"] == {("all-MiniLM-L6-v2", OLD_VERSION)}

    with read_scope() as session:  # the vectors are the new model's, not relabelled old ones
        for filename, doc_id in ids.items():
            stored = session.scalars(select(Chunk.embedding).where(Chunk.document_id == doc_id)
                                     .order_by(Chunk.ord)).all()
            np.testing.assert_allclose(np.stack(stored), new.encode(CORPUS[filename]),
                                       atol=1e-5)
    assert maintenance.reembed_outdated_chunks()["documents"] == 0  # idempotent


class _Interrupted(Exception):
    pass


class _DiesOnSecondDocument:
    """The configured embedder, whose worker dies (time limit, kill) on the second document."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.model_name = embedder.model_name
        self.model_version = embedder.model_version
        self.calls = 0

    def encode(self, texts: list[str]) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise _Interrupted("worker stopped mid-sweep")
        return self.embedder.encode(texts)


def test_an_interrupted_sweep_leaves_no_mixed_document_and_resumes(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch, old_model: Embedder,
    new_model_dir: Path,
) -> None:
    ids = _seed(old_model)
    _configure(monkeypatch, SLUICE_EMBEDDING_MODEL_PATH=str(new_model_dir))
    new = resources.embedder()
    dying = _DiesOnSecondDocument(new)
    with pytest.raises(_Interrupted):
        reembed_outdated(embedder=dying, max_chunks=1000)  # type: ignore[arg-type]
    versions = _versions()
    assert sorted(len(v) for v in versions.values()) == [1] * len(ids)  # none mixed
    assert sum(v == {(new.model_name, new.model_version)} for v in versions.values()) == 1

    result = maintenance.reembed_outdated_chunks()
    assert (result["documents"], result["chunks"], result["remaining"]) == (4, 12, 0)
    assert all(v == {(new.model_name, new.model_version)} for v in _versions().values())


def test_a_document_that_changed_while_encoded_is_not_switched(
    any_db: dict[str, str], old_model: Embedder,
) -> None:
    ids = _seed(old_model)
    doc_id = ids["bees.txt"]
    with read_scope() as session:
        chunks = reembed.document_chunks(session, document_id=doc_id)
    vectors = [np.ones(384, dtype=np.float32) / np.sqrt(384)] * len(chunks)
    with session_scope() as session:  # re-parsed meanwhile: a chunk went
        session.delete(session.get_one(Chunk, chunks[-1].id))
    with session_scope() as session:
        assert not reembed.switch_document(
            session, document_id=doc_id, chunk_ids=[c.id for c in chunks], vectors=vectors,
            model="m", version="m@2")
    with session_scope() as session:
        session.get_one(Document, ids["tides.txt"]).status = "processing"
    with read_scope() as session:
        tides = reembed.document_chunks(session, document_id=ids["tides.txt"])
    with session_scope() as session:
        assert not reembed.switch_document(
            session, document_id=ids["tides.txt"], chunk_ids=[c.id for c in tides],
            vectors=vectors[: len(tides)], model="m", version="m@2")
    assert all(v == {("all-MiniLM-L6-v2", OLD_VERSION)} for v in _versions().values())


@pytest.mark.integration
def test_beat_and_a_real_maintenance_worker_sweep_to_the_new_version(
    sluice_env: dict[str, str], stack: StackFactory, monkeypatch: pytest.MonkeyPatch,
    old_model: Embedder, new_model_dir: Path,
) -> None:
    """The beat schedule's entry reaches a maintenance worker process, which sweeps."""
    ids = _seed(old_model)
    env = {**sluice_env, "SLUICE_EMBEDDING_MODEL_PATH": str(new_model_dir),
           "SLUICE_REEMBED_INTERVAL_S": "1", "SLUICE_REEMBED_CHUNKS_PER_RUN": "6",
           "SLUICE_RECONCILE_INTERVAL_S": "5"}
    _configure(monkeypatch, **{k: v for k, v in env.items() if k.startswith("SLUICE_")})
    new = resources.embedder()
    s = stack(env, queues="maintenance", api=False, beat=True, concurrency=1)
    deadline = time.monotonic() + 300
    while True:
        with read_scope() as session:
            if reembed.count_outdated(session, version=new.model_version) == 0:
                break
        assert time.monotonic() < deadline, s.logs()
        assert not _mixed_documents()
        time.sleep(0.5)
    assert all(v == {(new.model_name, new.model_version)} for v in _versions().values())
    _check_searches(ids, [NumpyQueryEncoder(new_model_dir).encode_one])
    assert "re-embed sweep to minilm-l6-v2-retrained" in s.log("worker0")


def test_dense_search_compares_the_query_only_with_vectors_of_its_model(
    any_db: dict[str, str], monkeypatch: pytest.MonkeyPatch, old_model: Embedder,
    new_model_dir: Path,
) -> None:
    """Halfway through a model switch, a query of the new model meets only the re-embedded
    chunks in dense search (the old vectors are another space), and the old model's query only
    the old ones; full-text search still finds every document."""
    ids = _seed(old_model)
    _configure(monkeypatch, SLUICE_EMBEDDING_MODEL_PATH=str(new_model_dir),
               SLUICE_REEMBED_CHUNKS_PER_RUN="3")
    new = resources.embedder()
    api_encoder = NumpyQueryEncoder(new_model_dir)
    assert api_encoder.model_version == new.model_version != OLD_VERSION
    assert maintenance.reembed_outdated_chunks()["documents"] == 1
    swept = {doc for doc, versions in _versions().items()
             if versions == {(new.model_name, new.model_version)}}
    assert len(swept) == 1
    with read_scope() as session:
        for question in QUESTIONS:
            for encode, version, allowed in (
                (api_encoder.encode_one, new.model_version, swept),
                (lambda q: old_model.encode([q])[0], OLD_VERSION, set(ids.values()) - swept),
            ):
                dense = hybrid_search(session, workspace_id="ws", query=question,
                                      encode_query=encode, top_k=10, mode="dense",
                                      embedding_version=version)
                assert dense and {p.document_id for p in dense} <= allowed, (question, version)
            hybrid = hybrid_search(session, workspace_id="ws", query=question,
                                   encode_query=api_encoder.encode_one, top_k=10,
                                   embedding_version=new.model_version)
            assert ids[QUESTIONS[question]] in {p.document_id for p in hybrid}, question
