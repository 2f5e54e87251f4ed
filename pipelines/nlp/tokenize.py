"""Rule-based sentence and Penn-Treebank-style word tokenisation.

These replace spaCy's tokenizer and parser-based sentence splitter inside unstructured, whose
element classifier only counts sentences and words and asks the tagger for verbs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Used when no treebank-derived list is at hand (the heuristic fallback); the trained tagger
# carries the abbreviations seen in its treebank on top of these.
DEFAULT_ABBREVIATIONS: frozenset[str] = frozenset(
    """
    mr. mrs. ms. dr. prof. sr. jr. st. mt. ft. vs. etc. inc. ltd. co. corp. llc. dept. est.
    approx. no. nos. fig. figs. vol. pp. ed. eds. al. cf. gen. gov. sen. rep. rev. capt.
    jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec. mon. tue. wed. thu. fri.
    sat. sun. e.g. i.e. a.m. p.m. u.s. u.k. u.n. ph.d. b.a. m.a. b.sc. m.sc.
    """.split()
)

_OPENING = "\"'([{<“‘«`$£€#"
_CLOSING = "\"')]}>”’»,;:!?%"
_CONTRACTION_RE = re.compile(r"(?i)^(\w+?)(n['’]t|['’](?:s|re|ve|ll|d|m))$")
_INITIALS_RE = re.compile(r"(?:[^\W\d_]\.)+")
_URL_OR_EMAIL_RE = re.compile(
    r"(?i)^(?:[a-z][a-z0-9+.-]*://\S+|www\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)$"
)
# Sentence terminators of many scripts; the full-width (CJK) ones need no space after them.
_TERMINATORS = ".!?…։।॥؟۔።᙮"
_FULL_WIDTH_TERMINATORS = "。！？"
_SENTENCE_END_RE = re.compile(
    rf"([{_TERMINATORS}]+|[{_FULL_WIDTH_TERMINATORS}]+)([\"'”’)\]」』）]*)(\s*)(?=\S)"
)
# Punctuation that is never part of a word, so it is split off even without spaces around it.
_NON_WORD_PUNCT_RE = re.compile(r"([，。！？、；：「」『』（）《》〈〉【】।॥։።؟،۔᙮])")
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n\s*")


def keeps_period(chunk: str, abbreviations: frozenset[str]) -> bool:
    """Whether the final period of ``chunk`` belongs to it (``Mr.``, ``U.S.``, ``J.``)."""
    return chunk.lower() in abbreviations or _INITIALS_RE.fullmatch(chunk) is not None


def word_tokenize(text: str, abbreviations: frozenset[str] = DEFAULT_ABBREVIATIONS) -> list[str]:
    """Split ``text`` into Penn Treebank tokens: punctuation and clitics (``n't``, ``'s``) apart."""
    tokens: list[str] = []
    for chunk in _NON_WORD_PUNCT_RE.sub(r" \1 ", text).split():
        tokens.extend(_split_chunk(chunk, abbreviations))
    return tokens


def _split_chunk(chunk: str, abbreviations: frozenset[str]) -> list[str]:
    if _URL_OR_EMAIL_RE.match(chunk.rstrip(_CLOSING + ".")):
        core = chunk.rstrip(_CLOSING + ".")
        return [core, *_split_chunk(chunk[len(core) :], abbreviations)] if core != chunk else [core]
    head: list[str] = []
    while len(chunk) > 1 and chunk[0] in _OPENING:
        size = 2 if chunk.startswith("``") else 1
        head.append(chunk[:size])
        chunk = chunk[size:]
    tail: list[str] = []
    while len(chunk) > 1:
        if chunk.endswith("..."):
            tail.append("...")
            chunk = chunk[:-3]
        elif chunk[-1] in _CLOSING or chunk[-1] == "…":
            tail.append(chunk[-1])
            chunk = chunk[:-1]
        elif chunk[-1] == "." and not keeps_period(chunk, abbreviations):
            tail.append(".")
            chunk = chunk[:-1]
        else:
            break
    middle = [chunk] if chunk else []
    match = _CONTRACTION_RE.match(chunk)
    if match:
        middle = [match.group(1), match.group(2)]
    return head + middle + tail[::-1]


def sent_tokenize(text: str, abbreviations: frozenset[str] = DEFAULT_ABBREVIATIONS) -> list[str]:
    """Split ``text`` into sentences.

    A sentence ends at ``.``, ``!``, ``?``, ``…`` or another script's full stop (``।``,
    ``։``, ``።``…), with any closing quotes or brackets, followed by whitespace (none is needed
    after the CJK ``。！？``), unless the period closes an abbreviation or an initial, or the
    next word starts in lower case; a blank line always ends one.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_BREAK_RE.split(text):
        sentences.extend(_split_paragraph(paragraph, abbreviations))
    return sentences


def _split_paragraph(paragraph: str, abbreviations: frozenset[str]) -> Iterable[str]:
    start = 0
    for match in _SENTENCE_END_RE.finditer(paragraph):
        if not _is_boundary(paragraph, match, abbreviations):
            continue
        sentence = paragraph[start : match.end(2)].strip()
        if sentence:
            yield sentence
        start = match.end()
    rest = paragraph[start:].strip()
    if rest:
        yield rest


def _is_boundary(paragraph: str, match: re.Match[str], abbreviations: frozenset[str]) -> bool:
    if not match.group(3) and match.group(1)[0] not in _FULL_WIDTH_TERMINATORS:
        return False  # "3.14", "e.g.x", "Yahoo!Mail"
    following = paragraph[match.end()]
    if following.islower():
        return False
    if match.group(1) != ".":
        return True
    end = match.start()
    chunk_start = max(paragraph.rfind(" ", 0, end), paragraph.rfind("\n", 0, end))
    chunk = paragraph[chunk_start + 1 : match.end(1)].lstrip(_OPENING)
    return not keeps_period(chunk, abbreviations)
