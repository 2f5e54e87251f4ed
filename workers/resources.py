"""Heavy per-process resources, created on first use in the process that uses them."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import TYPE_CHECKING

from sluice.blobs import BlobStore
from sluice.settings import get_settings

if TYPE_CHECKING:
    from pipelines.embedding import Embedder

_lock = threading.Lock()


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
            )
        return _embedder
