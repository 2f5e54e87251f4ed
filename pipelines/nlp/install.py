"""Plug our tokenisers and tagger into unstructured in place of spaCy's ``en_core_web_sm``.

unstructured 0.27 loads ``en_core_web_sm`` on first use and downloads it when missing; offline
that raises, every format but CSV fails, and ``partition_pdf(strategy="fast")`` silently
returns no elements. Its element classifier (``unstructured.partition.text_type``) needs only
three functions of ``unstructured.nlp.tokenize``: ``sent_tokenize``, ``word_tokenize`` and
``pos_tag`` (Penn Treebank tags). ``install`` replaces those three, wherever they were imported
by name, and disables the model loader so that nothing can try the network.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError
from pipelines.nlp import tokenize
from pipelines.nlp.base import Tagger
from pipelines.nlp.heuristic import HeuristicTagger
from pipelines.nlp.training import load_tagger

_PATCHED_NAMES = ("sent_tokenize", "word_tokenize", "pos_tag")
_CACHE_SIZE = 1024

_lock = threading.Lock()
_installed: tuple[Path | None, Tagger] | None = None
# Every function object that may sit under one of _PATCHED_NAMES: unstructured's originals,
# then whatever an earlier install() put there.
# Kept as strong references, so an identity check cannot be fooled by a recycled id().
_replaceable: list[object] = []


class SpacyDisabledError(PipelineError):
    """Something in unstructured still reached for the spaCy model after install(): a bug in
    this module (a patch point missed after an unstructured upgrade), not in the document."""

    code = "nlp_not_installed"


def install(tagger_path: Path | None) -> Tagger:
    """Make unstructured tokenise and tag with our tagger; return the tagger in use.

    ``tagger_path`` is a weights file from ``train_tagger``/``ensure_tagger``; ``None`` installs
    the rule-based ``HeuristicTagger`` (less accurate, see docs/parsing.md). Idempotent and
    thread-safe; calling again with another path switches taggers. Call it in the process that
    partitions, before partitioning.
    """
    global _installed
    key = tagger_path.resolve() if tagger_path is not None else None
    with _lock:
        if _installed is not None and _installed[0] == key:
            return _installed[1]
        tagger: Tagger = load_tagger(tagger_path) if tagger_path is not None else HeuristicTagger()
        _patch_unstructured(nlp_functions(tagger))
        _installed = (key, tagger)
        return tagger


def installed_tagger() -> Tagger | None:
    """The tagger the last ``install`` put in place, if any."""
    return _installed[1] if _installed is not None else None


def nlp_functions(tagger: Tagger) -> dict[str, Callable[[str], Any]]:
    """The three functions unstructured calls, with its signatures, backed by ``tagger``."""
    abbreviations = tagger.abbreviations

    @lru_cache(maxsize=_CACHE_SIZE)
    def _sentences(text: str) -> tuple[str, ...]:
        return tuple(tokenize.sent_tokenize(str(text), abbreviations))

    @lru_cache(maxsize=_CACHE_SIZE)
    def _words(text: str) -> tuple[str, ...]:
        return tuple(tokenize.word_tokenize(str(text), abbreviations))

    @lru_cache(maxsize=_CACHE_SIZE)
    def _tagged(text: str) -> tuple[tuple[str, str], ...]:
        tagged: list[tuple[str, str]] = []
        for sentence in _sentences(text):  # tag sentence by sentence: tags depend on context
            words = _words(sentence)
            tagged.extend(zip(words, tagger.tag(words), strict=True))
        return tuple(tagged)

    def sent_tokenize(text: str) -> list[str]:
        return list(_sentences(text))

    def word_tokenize(text: str) -> list[str]:
        return list(_words(text))

    def pos_tag(text: str) -> list[tuple[str, str]]:
        return list(_tagged(text))

    return {"sent_tokenize": sent_tokenize, "word_tokenize": word_tokenize, "pos_tag": pos_tag}


def _spacy_disabled() -> Any:
    raise SpacyDisabledError(
        "spaCy model loading is disabled: pipelines.nlp.install() provides unstructured's "
        "tokenisation and tagging"
    )


def _patch_unstructured(functions: dict[str, Callable[[str], Any]]) -> None:
    import unstructured.nlp.tokenize as upstream
    import unstructured.partition.text_type  # noqa: F401  (imports the functions by name)

    if not _replaceable:
        _replaceable.extend(getattr(upstream, name) for name in _PATCHED_NAMES)
    upstream._get_nlp = _spacy_disabled  # type: ignore[assignment]
    loaded = list(sys.modules.items())  # a snapshot: another thread may be importing
    for module in [m for name, m in loaded if name.startswith("unstructured") and m]:
        for name in _PATCHED_NAMES:
            current = getattr(module, name, None)
            if any(current is function for function in _replaceable):
                setattr(module, name, functions[name])
    _replaceable.extend(functions.values())
