"""The embedder with the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.embedding import (
    Embedder,
    default_model_path,
    default_model_version,
    length_sorted_order,
)

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "A man is eating food.",
    "Roberts joined Watford as a trainee, signing his first professional contract in July 1986, "
    "shortly after his 18th birthday, and scored the only goal against Manchester United.",
    "Hi",
    "A man is eating a piece of bread.",
    "Total net sales were $81,797 million for the quarter ended July 1, 2023, compared with "
    "$82,959 million a year earlier; iPhone, Mac and iPad sales decreased while Services grew.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.default(batch_size=2)


def test_import_and_construction_load_nothing_heavy() -> None:
    code = (
        "import sys; from pipelines.embedding import Embedder, default_model_path;"
        "e = Embedder(default_model_path());"
        "assert not e.loaded;"
        "heavy = {'torch', 'sentence_transformers', 'transformers'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_sanity_similarity(embedder: Embedder) -> None:
    vectors = embedder.encode(["A man is eating food.", "A man is eating a piece of bread."])
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.7553, abs=0.001)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_shape_dtype_and_normalisation(embedder: Embedder) -> None:
    vectors = embedder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.dimension == 384
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder.encode("one string")  # type: ignore[arg-type]


def test_length_sorted_batches_keep_the_input_order(embedder: Embedder) -> None:
    together = embedder.encode(TEXTS)  # batch_size=2, so sorting moves texts across batches
    one_by_one = np.vstack([embedder.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    # Each row is its own text: it is nearest to itself among all the others.
    assert list(np.argmax(together @ one_by_one.T, axis=1)) == list(range(len(TEXTS)))


def test_identity(embedder: Embedder) -> None:
    assert embedder.model_name == "all-MiniLM-L6-v2"
    assert embedder.model_version == default_model_version() == "all-MiniLM-L6-v2@0.1.0"
    assert (Path(default_model_path()) / "config.json").is_file()
    copy_elsewhere = Embedder("/nonexistent/my-model", model_version="my-model@7")
    assert (copy_elsewhere.model_name, copy_elsewhere.model_version) == ("my-model", "my-model@7")


def test_length_sorted_order_is_longest_first_and_stable() -> None:
    assert list(length_sorted_order(["bb", "a", "ccc", "dd"])) == [2, 0, 3, 1]


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Embedder("x", batch_size=0)
    with pytest.raises(ValueError):
        Embedder("x", threads=0)


def test_onnx_backend_gives_sentence_transformers_vectors(
    embedder: Embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The graph is exported once from the packaged weights (nothing downloaded) and gives the
    same vectors, truncation of a >256-token text included; a second embedder reuses it."""
    long_text = " ".join(["The quarterly report discussed revenue, margins and outlook."] * 60)
    texts = [*TEXTS, long_text]
    reference = embedder.encode(texts)
    onnx = Embedder.default(batch_size=2, backend="onnx", graph_dir=tmp_path / "models")
    vectors = onnx.encode(texts)
    assert onnx.backend == "onnx" and onnx.loaded
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert onnx.model_version == embedder.model_version  # same vectors, same version
    graphs = list((tmp_path / "models").glob("*.onnx"))
    assert len(graphs) == 1 and not list((tmp_path / "models").glob("*.tmp"))
    mtime = graphs[0].stat().st_mtime_ns
    again = Embedder.default(backend="onnx", graph_dir=tmp_path / "models")
    np.testing.assert_allclose(again.encode(texts[:2]), reference[:2], atol=1e-5)
    assert graphs[0].stat().st_mtime_ns == mtime  # not exported again


def test_onnx_backend_falls_back_to_torch_for_a_model_it_cannot_run(
    embedder: Embedder, tmp_path: Path,
) -> None:
    model = tmp_path / "max-pooled"
    model.mkdir()
    for entry in Path(default_model_path()).iterdir():
        if entry.name != "1_Pooling":
            (model / entry.name).symlink_to(entry)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": false, '
        '"pooling_mode_max_tokens": true}')
    fallback = Embedder(model, backend="onnx", graph_dir=tmp_path / "models")
    vectors = fallback.encode(TEXTS[:2])
    assert fallback.backend == "torch"
    assert vectors.shape == (2, 384)
    assert not np.allclose(vectors, embedder.encode(TEXTS[:2]), atol=1e-3)  # max, not mean
