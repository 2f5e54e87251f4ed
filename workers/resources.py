"""Heavy per-process resources, created on first use in the process that uses them."""

from __future__ import annotations

import fcntl
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sluice.blobs import BlobStore
from sluice.settings import get_settings

if TYPE_CHECKING:
    from pipelines.answering import Generator
    from pipelines.embedding import Embedder

log = logging.getLogger(__name__)
_lock = threading.RLock()


@lru_cache(maxsize=1)
def blob_store() -> BlobStore:
    return BlobStore(get_settings().resolved_blob_dir)


_embedder: Embedder | None = None


def embedder() -> Embedder:
    """The embedding model, loaded once per worker process (never before a fork)."""
    global _embedder
    with _lock:
        if _embedder is None:
            from pipelines.embedding import Embedder, default_model_path

            settings = get_settings()
            _embedder = Embedder(
                model_path=settings.embedding_model_path or default_model_path(),
                batch_size=settings.embedding_batch_size,
                threads=settings.embedding_threads,
                backend=settings.embedding_backend,
                graph_dir=settings.resolved_data_dir / "models",
            )
        return _embedder


_tagger: Path | None = None
_tagger_checked = False


def tagger_path() -> Path | None:
    """The trained part-of-speech tagger unstructured's element classification uses, trained
    once from the treebank if needed (one process trains, the others wait on a file lock).
    None means the documented heuristic fallback."""
    global _tagger, _tagger_checked
    with _lock:
        if _tagger_checked:
            return _tagger
        settings = get_settings()
        if settings.tagger_path is not None:
            _tagger = settings.tagger_path if settings.tagger_path.exists() else None
        elif settings.treebank_dir is not None:
            from pipelines.nlp.training import ensure_tagger

            cache = settings.resolved_data_dir / "nlp"
            cache.mkdir(parents=True, exist_ok=True)
            with (cache / ".lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _tagger = ensure_tagger(settings.treebank_dir, cache)
        if _tagger is None:
            log.warning("no trained POS tagger (set SLUICE_TREEBANK_DIR or SLUICE_TAGGER_PATH): "
                        "element classification uses the heuristic fallback")
        _tagger_checked = True
        return _tagger


_generator: Generator | None = None


def generator() -> Generator:
    """The answer generator: an OpenAI-compatible endpoint when configured, else extractive."""
    global _generator
    settings = get_settings()
    if _generator is None:
        if settings.llm_url:
            from pipelines.generation import OpenAICompatibleGenerator

            _generator = OpenAICompatibleGenerator(
                base_url=settings.llm_url, model=settings.llm_model or "default",
                api_key=settings.llm_api_key, timeout=settings.llm_timeout_s,
            )
        else:
            from pipelines.answering import ExtractiveGenerator

            model = embedder()
            kwargs = {} if settings.answer_min_score is None else {
                "min_score": settings.answer_min_score}
            _generator = ExtractiveGenerator(encode=model.encode, **kwargs)
    return _generator
