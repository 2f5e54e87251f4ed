"""Sentence embeddings for queries in pure numpy: the same vectors as the workers, without torch.

:class:`NumpyQueryEncoder` mirrors, in float32, what ``SentenceTransformer(model_dir)`` computes
for a BERT model such as all-MiniLM-L6-v2: the ``tokenizers`` tokenizer from ``tokenizer.json``
(``[CLS] … [SEP]``, truncated to ``max_seq_length``), a ``transformers`` ``BertModel`` forward pass
(word + position + token-type embeddings, LayerNorm, post-LayerNorm encoder layers with
multi-head self-attention and an exact-erf GELU feed-forward block), then the sentence-transformers
``Pooling`` (mean over non-padding tokens) and ``Normalize`` (L2) modules. The HTTP API uses it to
embed search queries: the API process never imports torch.

Only what that pipeline needs is implemented; a model directory that asks for anything else
(another pooling mode, a ``Dense`` module, another activation) is refused with ``ValueError``
when the encoder is built, rather than silently producing different vectors.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

DEFAULT_BATCH_SIZE = 16

_TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, used by Normalize
_POOLING_MIN_TOKENS = 1e-9  # Pooling clamps the token count to this before dividing
# Numerical Recipes' erfcc, highest power first: erfc(z) ≈ t·exp(P(t) − z²), t = 1 / (1 + z/2).
_ERFC_COEFFICIENTS = np.array(
    [0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
     0.37409196, 1.00002368, -1.26551223],
    dtype=np.float32,
)


@dataclass(frozen=True)
class EncoderConfig:
    """What the model directory's JSON files say about the forward pass."""

    hidden_size: int
    num_heads: int
    num_layers: int
    layer_norm_eps: float
    max_seq_length: int
    lowercase_input: bool
    normalize: bool

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class _Layer:
    # Weights are stored transposed (in_features, out_features) so that a layer is `x @ w + b`;
    # query, key and value are fused into one matrix so each layer runs one GEMM for all three.
    qkv_weight: FloatArray
    qkv_bias: FloatArray
    attention_out_weight: FloatArray
    attention_out_bias: FloatArray
    attention_norm_weight: FloatArray
    attention_norm_bias: FloatArray
    intermediate_weight: FloatArray
    intermediate_bias: FloatArray
    output_weight: FloatArray
    output_bias: FloatArray
    output_norm_weight: FloatArray
    output_norm_bias: FloatArray


@dataclass(frozen=True)
class _Weights:
    word_embeddings: FloatArray
    position_embeddings: FloatArray
    token_type_embeddings: FloatArray
    embedding_norm_weight: FloatArray
    embedding_norm_bias: FloatArray
    layers: tuple[_Layer, ...]


@dataclass(frozen=True)
class _Batch:
    input_ids: IntArray  # (batch, seq)
    token_type_ids: IntArray  # (batch, seq)
    attention_mask: FloatArray  # (batch, seq): 1.0 for real tokens, 0.0 for padding


class NumpyQueryEncoder:
    """Encodes texts into L2-normalised float32 vectors, like the workers' sentence-transformers.

    The small JSON configs are read (and validated) when the encoder is built; the weights and
    tokenizer are loaded on the first :meth:`encode`, once, even when several threads call it
    at the same time. After loading, the encoder is read-only and safe to share between threads.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self._model_dir = Path(model_dir)
        self._config = read_encoder_config(self._model_dir)
        self._weights: _Weights | None = None
        self._tokenizer: Any = None
        self._model_version: str | None = None
        self._lock = threading.Lock()

    @property
    def model_dir(self) -> Path:
        return self._model_dir

    @property
    def config(self) -> EncoderConfig:
        return self._config

    @property
    def model_version(self) -> str:
        """The version of the model (as stored with the workers' vectors), computed once."""
        if self._model_version is None:
            from pipelines.embedding import model_version_of

            self._model_version = model_version_of(self._model_dir)
        return self._model_version

    @property
    def dimension(self) -> int:
        """Length of every vector (384 for all-MiniLM-L6-v2); known without loading weights."""
        return self._config.hidden_size

    @property
    def loaded(self) -> bool:
        return self._weights is not None

    def encode(self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE) -> Vectors:
        """Embed texts into an ``(len(texts), dimension)`` float32 array; row i is ``texts[i]``.

        Texts are batched by token length (longest first), so a batch pads to similar lengths.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        weights, tokenizer = self._load()
        if self._config.lowercase_input:
            texts = [text.lower() for text in texts]
        encodings = tokenizer.encode_batch(list(texts))
        lengths = np.array([len(encoding.ids) for encoding in encodings])
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(encodings), batch_size):
            rows = order[start : start + batch_size]
            batch = _pad([encodings[i] for i in rows])
            out[rows] = self._embed(weights, batch)
        return out

    def encode_one(self, text: str) -> Vectors:
        """Embed one text into a ``(dimension,)`` float32 vector."""
        return self.encode([text])[0]

    def _load(self) -> tuple[_Weights, Any]:
        if self._weights is None:
            with self._lock:
                if self._weights is None:
                    # Tokenizer first: `_weights` is the "loaded" flag read without the lock.
                    self._tokenizer = load_tokenizer(self._model_dir, self._config)
                    self._weights = load_weights(self._model_dir, self._config)
        return self._weights, self._tokenizer

    def _embed(self, weights: _Weights, batch: _Batch) -> Vectors:
        """BertModel's last hidden state → mean pooling → optional L2 normalisation."""
        config = self._config
        n, seq = batch.input_ids.shape
        hidden = _embeddings(weights, batch, eps=config.layer_norm_eps)  # (n * seq, hidden)
        # Additive attention bias over keys: 0 for real tokens, -inf for padding. Every row has
        # [CLS], so no softmax row is all -inf.
        key_bias = np.where(batch.attention_mask > 0, np.float32(0), np.float32(-np.inf))
        key_bias = key_bias[:, None, None, :]  # (n, 1, 1, seq)
        for layer in weights.layers:
            hidden = _encoder_layer(hidden, layer, key_bias, config=config, shape=(n, seq))
        return pool(hidden.reshape(n, seq, config.hidden_size), batch.attention_mask,
                    normalize=config.normalize)


def pool(tokens: FloatArray, attention_mask: FloatArray, *, normalize: bool) -> Vectors:
    """sentence-transformers' ``Pooling`` (mean over real tokens) and ``Normalize`` (L2) of a
    last hidden state ``(n, seq, hidden)``."""
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = (tokens * mask).sum(axis=1)
    counts = np.maximum(mask.sum(axis=1), np.float32(_POOLING_MIN_TOKENS))
    pooled: Vectors = (summed / counts).astype(np.float32)
    if normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norms, np.float32(_NORMALIZE_EPS))
    return pooled


def read_encoder_config(model_dir: Path) -> EncoderConfig:
    """Read and validate the sentence-transformers + BERT configs of ``model_dir``."""
    modules = _read_json(model_dir / "modules.json")
    module_types = [str(module["type"]) for module in modules]
    unsupported = [t for t in module_types if t not in {_TRANSFORMER_MODULE, _POOLING_MODULE,
                                                        _NORMALIZE_MODULE}]
    if unsupported or module_types[:2] != [_TRANSFORMER_MODULE, _POOLING_MODULE]:
        raise ValueError(f"{model_dir}: only Transformer → Pooling [→ Normalize] models are "
                         f"supported, not {module_types}")
    pooling_path = next(str(m["path"]) for m in modules if m["type"] == _POOLING_MODULE)

    bert = _read_json(model_dir / "config.json")
    if bert.get("model_type") != "bert":
        raise ValueError(f"{model_dir}: model_type {bert.get('model_type')!r} is not 'bert'")
    if bert.get("hidden_act") != "gelu":
        raise ValueError(f"{model_dir}: hidden_act {bert.get('hidden_act')!r} is not 'gelu'")
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}: only absolute position embeddings are supported")
    hidden_size = int(bert["hidden_size"])
    num_heads = int(bert["num_attention_heads"])
    if hidden_size % num_heads:
        raise ValueError(f"{model_dir}: hidden_size {hidden_size} is not a multiple of the heads")

    pooling = _read_json(model_dir / pooling_path / "config.json")
    modes = {key for key, value in pooling.items() if key.startswith("pooling_mode_") and value}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ValueError(f"{model_dir}: only mean pooling is supported, not {sorted(modes)}")
    if int(pooling.get("word_embedding_dimension", hidden_size)) != hidden_size:
        raise ValueError(f"{model_dir}: pooling dimension differs from hidden_size")

    sentence_bert = _read_json(model_dir / "sentence_bert_config.json")
    max_positions = int(bert["max_position_embeddings"])
    max_seq_length = int(sentence_bert.get("max_seq_length") or max_positions)
    if max_seq_length > max_positions:
        raise ValueError(f"{model_dir}: max_seq_length {max_seq_length} exceeds "
                         f"max_position_embeddings {max_positions}")
    return EncoderConfig(
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_layers=int(bert["num_hidden_layers"]),
        layer_norm_eps=float(bert["layer_norm_eps"]),
        max_seq_length=max_seq_length,
        lowercase_input=bool(sentence_bert.get("do_lower_case", False)),
        normalize=_NORMALIZE_MODULE in module_types,
    )


def load_tokenizer(model_dir: Path, config: EncoderConfig) -> Any:
    """The ``tokenizers.Tokenizer`` of ``tokenizer.json``, set up as sentence-transformers does.

    The file's own truncation (128) and fixed padding are replaced: sentence-transformers
    truncates to ``max_seq_length`` (special tokens included) and pads to the longest text, which
    :func:`_pad` does here per batch.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=config.max_seq_length, strategy="longest_first")
    return tokenizer


def load_weights(model_dir: Path, config: EncoderConfig) -> _Weights:
    """Read ``model.safetensors`` into float32 arrays laid out for ``x @ w + b``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    # Some exports prefix every name with the architecture ("bert.embeddings…").
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""

    def tensor(name: str) -> FloatArray:
        return np.ascontiguousarray(tensors[prefix + name], dtype=np.float32)

    def linear(name: str) -> FloatArray:
        return np.ascontiguousarray(tensor(f"{name}.weight").T)

    layers = []
    for index in range(config.num_layers):
        base = f"encoder.layer.{index}"
        attention = f"{base}.attention"
        layers.append(_Layer(
            qkv_weight=np.ascontiguousarray(np.concatenate(
                [linear(f"{attention}.self.{part}") for part in ("query", "key", "value")], axis=1
            )),
            qkv_bias=np.concatenate(
                [tensor(f"{attention}.self.{part}.bias") for part in ("query", "key", "value")]
            ),
            attention_out_weight=linear(f"{attention}.output.dense"),
            attention_out_bias=tensor(f"{attention}.output.dense.bias"),
            attention_norm_weight=tensor(f"{attention}.output.LayerNorm.weight"),
            attention_norm_bias=tensor(f"{attention}.output.LayerNorm.bias"),
            intermediate_weight=linear(f"{base}.intermediate.dense"),
            intermediate_bias=tensor(f"{base}.intermediate.dense.bias"),
            output_weight=linear(f"{base}.output.dense"),
            output_bias=tensor(f"{base}.output.dense.bias"),
            output_norm_weight=tensor(f"{base}.output.LayerNorm.weight"),
            output_norm_bias=tensor(f"{base}.output.LayerNorm.bias"),
        ))
    return _Weights(
        word_embeddings=tensor("embeddings.word_embeddings.weight"),
        position_embeddings=tensor("embeddings.position_embeddings.weight"),
        token_type_embeddings=tensor("embeddings.token_type_embeddings.weight"),
        embedding_norm_weight=tensor("embeddings.LayerNorm.weight"),
        embedding_norm_bias=tensor("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
    )


def erf(x: FloatArray) -> FloatArray:
    """The error function in float32 numpy, within 4e-7 of the exact value everywhere.

    Numerical Recipes' Chebyshev fit of erfc (``erfcc``, fractional error < 1.2e-7), so the API
    needs no scipy.
    """
    z = np.abs(x)
    t = np.float32(1) / (np.float32(1) + np.float32(0.5) * z)
    erfc = t * np.exp(np.polyval(_ERFC_COEFFICIENTS, t) - z * z)
    result: FloatArray = np.copysign(np.float32(1) - erfc, x)
    return result


def gelu(x: FloatArray) -> FloatArray:
    """BERT's ``hidden_act: gelu``: the exact ``x · Φ(x)``, not the tanh approximation."""
    result: FloatArray = np.float32(0.5) * x * (np.float32(1) + erf(x * np.float32(0.5**0.5)))
    return result


def layer_norm(x: FloatArray, weight: FloatArray, bias: FloatArray, *, eps: float) -> FloatArray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    result: FloatArray = centred / np.sqrt(variance + np.float32(eps)) * weight + bias
    return result


def softmax(x: FloatArray) -> FloatArray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    result: FloatArray = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def _embeddings(weights: _Weights, batch: _Batch, *, eps: float) -> FloatArray:
    n, seq = batch.input_ids.shape
    summed = (
        weights.word_embeddings[batch.input_ids]
        + weights.token_type_embeddings[batch.token_type_ids]
        + weights.position_embeddings[:seq][None, :, :]
    )
    return layer_norm(summed.reshape(n * seq, -1), weights.embedding_norm_weight,
                      weights.embedding_norm_bias, eps=eps)


def _encoder_layer(
    hidden: FloatArray,
    layer: _Layer,
    key_bias: FloatArray,
    *,
    config: EncoderConfig,
    shape: tuple[int, int],
) -> FloatArray:
    """One BertLayer on ``hidden`` of shape ``(batch * seq, hidden_size)``."""
    n, seq = shape
    heads, head_size = config.num_heads, config.head_size
    qkv = hidden @ layer.qkv_weight + layer.qkv_bias  # (n * seq, 3 * hidden)
    qkv = qkv.reshape(n, seq, 3, heads, head_size).transpose(2, 0, 3, 1, 4)  # (3, n, h, seq, d)
    query, key, value = qkv[0], qkv[1], qkv[2]
    scores = (query * np.float32(head_size**-0.5)) @ key.transpose(0, 1, 3, 2) + key_bias
    context = softmax(scores) @ value  # (n, h, seq, d)
    context = context.transpose(0, 2, 1, 3).reshape(n * seq, config.hidden_size)
    attention = context @ layer.attention_out_weight + layer.attention_out_bias
    hidden = layer_norm(attention + hidden, layer.attention_norm_weight,
                        layer.attention_norm_bias, eps=config.layer_norm_eps)
    intermediate = gelu(hidden @ layer.intermediate_weight + layer.intermediate_bias)
    output = intermediate @ layer.output_weight + layer.output_bias
    return layer_norm(output + hidden, layer.output_norm_weight, layer.output_norm_bias,
                      eps=config.layer_norm_eps)


def _pad(encodings: Sequence[Any]) -> _Batch:
    """Right-pad a batch of ``tokenizers.Encoding`` to its longest, as ``padding=True`` does."""
    seq = max(len(encoding.ids) for encoding in encodings)
    # Padding is masked out of attention and pooling, so the id it carries never matters.
    input_ids = np.zeros((len(encodings), seq), dtype=np.int64)
    token_type_ids = np.zeros((len(encodings), seq), dtype=np.int64)
    attention_mask = np.zeros((len(encodings), seq), dtype=np.float32)
    for row, encoding in enumerate(encodings):
        length = len(encoding.ids)
        input_ids[row, :length] = encoding.ids
        token_type_ids[row, :length] = encoding.type_ids
        attention_mask[row, :length] = 1.0
    return _Batch(input_ids=input_ids, token_type_ids=token_type_ids,
                  attention_mask=attention_mask)


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)
