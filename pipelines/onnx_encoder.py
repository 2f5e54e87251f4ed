"""The workers' embedding forward pass on onnxruntime: the same vectors as sentence-transformers,
faster on this CPU (MACHINE-FACTS.md: 363 vs 207 short texts/s; on SciFact chunks, idle, 50 vs
44 chunks/s, each at its best batch size; ``bench/ingest.py`` measures both in every run).

Tokenisation, pooling and normalisation are :class:`~pipelines.query_encoder.NumpyQueryEncoder`'s
(which mirror sentence-transformers); only ``BertModel``'s forward pass runs in onnxruntime,
from a graph exported once from the model directory's own weights with ``torch.onnx`` (about
1.5 s) and kept beside the other embedded state: nothing is downloaded. The graph is named by
the weights' version, so a changed model is exported again, never mixed up with the old one.
Vectors equal sentence-transformers' to ~2e-7 (``tests/unit/test_embedding.py``), so they are
stored under the same model version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.query_encoder import NumpyQueryEncoder, Vectors, _Batch, pool

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17
_ATTENTION = "eager"
"""The attention the graph is exported from: transformers' plain matmul-softmax-matmul, not
its default ``sdpa``, whose exported graph ran ~9% slower in onnxruntime on this CPU (588
SciFact chunks, one thread, batch 1, three alternating runs: 29.4 against 32.3 ms of CPU a
chunk). The vectors are the same to ~2e-7."""


class OnnxEncoder(NumpyQueryEncoder):
    """``encode(texts)`` as :class:`NumpyQueryEncoder`, with the forward pass in onnxruntime.

    ``graph_dir`` holds the exported graphs; ``threads`` is onnxruntime's intra-op thread count
    (None: its default, one per core)."""

    def __init__(self, model_dir: str | Path, *, graph_dir: Path, threads: int | None = None
                 ) -> None:
        super().__init__(model_dir)
        self._graph_dir = graph_dir
        self._threads = threads

    @property
    def graph_path(self) -> Path:
        key = hashlib.sha256(f"{self.model_version}|{self.model_dir.resolve()}|opset{_OPSET}"
                             f"|{_ATTENTION}".encode()).hexdigest()[:16]
        return self._graph_dir / f"encoder-{key}.onnx"

    def _load(self) -> tuple[Any, Any]:
        if self._weights is None:
            with self._lock:
                if self._weights is None:
                    from pipelines.query_encoder import load_tokenizer

                    self._tokenizer = load_tokenizer(self.model_dir, self.config)
                    self._weights = self._session()
        return self._weights, self._tokenizer

    def _session(self) -> Any:
        import onnxruntime

        path = self.graph_path
        if not path.exists():
            export_graph(self.model_dir, path)
        options = onnxruntime.SessionOptions()
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: a worker shares its cores with the
        # parse processes and the API, and spinning turned 36 CPU-s of encoding into 50 for
        # per-document batches (600 chunks, 3 at a time, here).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def _embed(self, weights: Any, batch: _Batch) -> Vectors:
        mask = batch.attention_mask.astype(np.int64)
        (hidden,) = weights.run(None, {"input_ids": batch.input_ids, "attention_mask": mask,
                                       "token_type_ids": batch.token_type_ids})
        return pool(hidden, batch.attention_mask, normalize=self.config.normalize)


def export_graph(model_dir: Path, target: Path) -> None:
    """Export ``BertModel``'s forward pass (inputs: ids, mask, token types; output: the last
    hidden state, batch and sequence dynamic) to ``target``, atomically: processes exporting
    at the same time each write their own file and the last rename wins, with equal bytes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    class _LastHiddenState(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    model = AutoModel.from_pretrained(str(model_dir), attn_implementation=_ATTENTION).eval()
    sample = torch.ones((2, 8), dtype=torch.int64)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        # (the exporter warns about its own internals: nothing a reader of our logs can act on)
        with torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _LastHiddenState(model), (sample, sample, torch.zeros_like(sample)), tmp,
                input_names=list(_INPUTS), output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "sequence"}
                              for name in (*_INPUTS, "last_hidden_state")},
                opset_version=_OPSET, dynamo=False,
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
