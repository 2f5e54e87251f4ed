"""Process-wide collaborators of the API, created on first use."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import TYPE_CHECKING

from sluice.blobs import BlobStore
from sluice.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipelines.query_encoder import NumpyQueryEncoder

_lock = threading.Lock()
_blobs: tuple[Settings, BlobStore] | None = None


def blob_store() -> BlobStore:
    """The blob store of the current settings (a new one when tests swap them): built once,
    as resolving its directory's path costs every upload ~0.2 ms of CPU in system calls."""
    global _blobs
    settings = get_settings()
    if _blobs is None or _blobs[0] is not settings:
        _blobs = (settings, BlobStore(settings.resolved_blob_dir))
    return _blobs[1]


@lru_cache(maxsize=1)
def query_encoder() -> NumpyQueryEncoder:
    """The query side of the embedding model, in numpy: the API never imports torch."""
    from pipelines.embedding import default_model_path
    from pipelines.query_encoder import NumpyQueryEncoder

    with _lock:
        return NumpyQueryEncoder(get_settings().embedding_model_path or default_model_path())


def publish_job(job_id: str, stage: str, *, mark: bool = True,
                request_id: str | None = None) -> bool:
    from tasks.publish import publish

    return publish(job_id, stage, mark=mark, request_id=request_id)


def dispatch_held(workspace_id: str, kind: str) -> int:
    """After a commit that freed slots or held jobs: publish the workspace's held jobs within
    its in-flight cap (`models.fairness`)."""
    from tasks.publish import dispatch

    return dispatch(workspace_id, kind)
