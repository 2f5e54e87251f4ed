"""Is the extracted text text? Refuse documents whose text is mostly garbage.

A parser can "succeed" on bytes that are not text: a binary file named ``.txt`` decoded in
some 8-bit encoding, a PDF whose fonts have no Unicode mapping (pdfminer's ``(cid:42)``), a
file decoded with the wrong codec (U+FFFD everywhere). Indexing that would fill the search
index with noise and answer nothing, silently; ``check_text`` refuses it with
``garbage_text`` and the measured ratios.

Measured over the non-space characters of all elements (at most ``sample_chars`` of them,
spread over the document):

- ``bad_ratio``: replacement characters (U+FFFD), control characters other than whitespace,
  unassigned and private-use code points, lone surrogates, and pdfminer's ``(cid:N)``
  placeholders;
- ``alnum_ratio``: letters and digits of any script (Unicode categories L* and N*).

A document is garbage when ``bad_ratio`` is above ``max_bad_ratio`` or ``alnum_ratio`` below
``min_alnum_ratio``. The defaults keep a wide margin from every real document in the test
corpus (docs/parsing.md has the figures); documents with less than ``min_chars`` of text are
never judged (a two-cell sheet of emoji is not garbage). A ratio of word-like tokens was tried
and dropped: dense source code has under 30% of its characters in tokens made mostly of
letters, so real code listings would have been refused; code is 40-50% letters and digits,
noise made of symbols is near 0%.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pipelines.errors import GarbageText
from pipelines.types import Element

_CID: Final = re.compile(r"\(cid:\d+\)")
_BAD_CATEGORIES: Final = frozenset({"Cc", "Cs", "Co", "Cn"})
_WHITESPACE_CONTROLS: Final = frozenset("\t\n\r\v\f\x1c\x1d\x1e\x1f\x85")


@dataclass(frozen=True, slots=True)
class HygieneLimits:
    max_bad_ratio: float = 0.10
    min_alnum_ratio: float = 0.20
    min_chars: int = 64
    sample_chars: int = 2_000_000


DEFAULT_LIMITS: Final = HygieneLimits()


@dataclass(frozen=True, slots=True)
class TextQuality:
    chars: int  # non-space characters measured
    bad_ratio: float
    alnum_ratio: float

    def is_garbage(self, limits: HygieneLimits) -> bool:
        if self.chars < limits.min_chars:
            return False
        return self.bad_ratio > limits.max_bad_ratio or self.alnum_ratio < limits.min_alnum_ratio


def measure(
    texts: Sequence[str], *, sample_chars: int = DEFAULT_LIMITS.sample_chars
) -> TextQuality:
    """Ratios over ``texts`` (element texts); long documents are sampled evenly."""
    text = _sample(texts, sample_chars)
    cids = _CID.findall(text)
    cid_chars = sum(len(c) for c in cids)
    text = _CID.sub(" ", text) if cids else text
    chars = cid_chars
    bad = cid_chars
    alnum = 0
    for ch in text:
        if ch.isspace():
            continue
        chars += 1
        category = unicodedata.category(ch)
        if category[0] in "LN":
            alnum += 1
        elif ch == "\ufffd" or (category in _BAD_CATEGORIES and ch not in _WHITESPACE_CONTROLS):
            bad += 1
    if chars == 0:
        return TextQuality(chars=0, bad_ratio=0.0, alnum_ratio=1.0)
    return TextQuality(chars=chars, bad_ratio=bad / chars, alnum_ratio=alnum / chars)


def check_text(
    elements: Sequence[Element], *, filename: str, limits: HygieneLimits = DEFAULT_LIMITS
) -> TextQuality:
    """``GarbageText`` if the elements' text is mostly not text; else the measurement."""
    quality = measure([e.text for e in elements], sample_chars=limits.sample_chars)
    if quality.is_garbage(limits):
        raise GarbageText(
            f"{filename}: the extracted text looks like garbage, not text "
            f"({quality.bad_ratio:.0%} replacement/control/unassigned characters, limit "
            f"{limits.max_bad_ratio:.0%}; {quality.alnum_ratio:.0%} letters and digits, minimum "
            f"{limits.min_alnum_ratio:.0%}; over {quality.chars:,} characters) — "
            "a binary file, a wrong text encoding, or a PDF whose fonts have no text mapping"
        )
    return quality


def _sample(texts: Sequence[str], budget: int) -> str:
    total = sum(len(t) for t in texts)
    if total <= budget:
        return "\n".join(texts)
    # Every k-th element, each cut to an equal share: judged over the whole length.
    picked = texts[:: max(1, -(-total // budget))]
    share = max(1, budget // len(picked))
    return "\n".join(text[:share] for text in picked)
