"""The fallback tagger for when no trained weights are available.

A closed-class lexicon (determiners, prepositions, pronouns, auxiliaries and a few hundred
frequent verb forms) plus suffix and context rules. It is far less accurate than the trained
tagger (see docs/parsing.md) and errs towards finding verbs in sentence-like text, so that
unstructured classifies prose as NarrativeText rather than dropping or mislabelling it; it
never downloads anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.nlp.tokenize import DEFAULT_ABBREVIATIONS


def _lexicon(table: dict[str, str]) -> dict[str, str]:
    return {word: tag for tag, words in table.items() for word in words.split()}


_CLOSED = _lexicon(
    {
        "DT": "the a an this that these those every each some any no all both another either "
        "neither",
        "IN": "of in for on with at by from about into over after under between through during "
        "without before against among around since until upon within because than while "
        "although though if whether per via across behind beyond toward towards near off",
        "TO": "to",
        "CC": "and or but nor & plus",
        "PRP": "i you he she it we they me him her us them myself yourself itself themselves",
        "PRP$": "my your his its our their",
        "MD": "can could will would shall should may might must 'll 'd wo ca",
        "RB": "not n't very also just only too so then now here there never always often even "
        "still already again",
        "WP": "who whom what",
        "WDT": "which whatever",
        "WRB": "where when why how",
        "EX": "",
        "VBZ": "is 's has does says goes gets makes",
        "VBP": "are 're am 'm have 've do",
        "VBD": "was were had did said went got made took came saw knew thought told gave found "
        "became left felt brought began kept held wrote stood heard meant set met ran paid sat "
        "spoke led grew lost fell sent built understood",
        "VB": "be",
        "VBN": "been done gone known taken seen given shown written",
        "VBG": "being having doing",
    }
)
# Frequent verbs whose base form would otherwise fall through to NN.
_BASE_VERBS = frozenset(
    """
    get make go know take see come think look want give use find tell ask work seem feel try
    leave call need keep let begin help show hear play run move live believe bring happen write
    provide sit stand lose pay meet include continue set learn change lead understand watch
    follow stop create speak read allow add spend grow open walk win offer remember love
    consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest
    raise pass sell require report decide pull explain describe ensure contain apply
    """.split()
)
_PUNCT = {
    ".": ".", "!": ".", "?": ".", ",": ",", ";": ":", ":": ":", "...": ":", "-": "HYPH",
    "--": ":", "(": "-LRB-", "[": "-LRB-", "{": "-LRB-", ")": "-RRB-", "]": "-RRB-",
    "}": "-RRB-", '"': "''", "“": "``", "”": "''", "``": "``", "''": "''", "$": "$", "#": "#",
    "%": "NN",
}
_ADJ_SUFFIXES = ("able", "ible", "ous", "ful", "ive", "al", "ic", "less", "ish", "ary")
_NOUN_SUFFIXES = ("tion", "sion", "ment", "ness", "ity", "ship", "ance", "ence", "ism", "ist")
_BEFORE_NOUNS = frozenset({"DT", "PRP$", "JJ", "IN"})
_SUBJECTS = frozenset({"PRP", "NNP", "NNS", "WP", "WDT", "EX"})


class HeuristicTagger:
    """Rule-based Penn tags: about 30 points below the trained tagger, but downloads nothing."""

    name = "heuristic"
    abbreviations = DEFAULT_ABBREVIATIONS

    def tag(self, words: Sequence[str]) -> list[str]:
        tags: list[str] = []
        for i, word in enumerate(words):
            prev = tags[-1] if tags else ""
            tags.append(self._tag_word(word, prev=prev, sentence_start=i == 0))
        return tags

    def _tag_word(self, word: str, *, prev: str, sentence_start: bool) -> str:
        lower = word.lower()
        if lower in _CLOSED:
            return "EX" if lower == "there" and not prev else _CLOSED[lower]
        if word in _PUNCT:
            return _PUNCT[word]
        if not any(c.isalnum() for c in word):
            return "NFP"
        if word[0].isdigit():
            return "CD"
        if prev in ("TO", "MD") or (lower in _BASE_VERBS and prev not in _BEFORE_NOUNS):
            return "VB"
        if word[0].isupper() and not sentence_start and not word.isupper():
            return "NNP"
        return self._by_suffix(lower, prev)

    @staticmethod
    def _by_suffix(lower: str, prev: str) -> str:
        if len(lower) > 4 and lower.endswith("ing"):
            return "VBG"
        if len(lower) > 4 and lower.endswith("ed"):
            return "VBN" if prev in ("VBZ", "VBP", "VBD") else "VBD"
        if len(lower) > 3 and lower.endswith("ly"):
            return "RB"
        if lower.endswith(_NOUN_SUFFIXES):
            return "NN"
        if lower.endswith(_ADJ_SUFFIXES):
            return "JJ"
        if len(lower) > 3 and lower.endswith("s") and not lower.endswith(("ss", "us", "is")):
            return "VBZ" if prev in _SUBJECTS or prev == "NN" else "NNS"
        return "VBP" if prev == "PRP" else "NN"
