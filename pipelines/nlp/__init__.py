"""Offline English NLP for unstructured: tokenisers and a part-of-speech tagger.

unstructured's element classifier wants sentences, words and Penn Treebank tags, which it
would otherwise get from a spaCy model it downloads on first use. ``train_tagger`` /
``ensure_tagger`` train an averaged-perceptron tagger on a treebank (once, cached by the
treebank's hash); ``install`` plugs it (or, with no weights, the rule-based fallback) into
unstructured. See docs/parsing.md for the measured accuracy of both.
"""

from pipelines.nlp.base import Tagger
from pipelines.nlp.heuristic import HeuristicTagger
from pipelines.nlp.install import SpacyDisabledError, install, installed_tagger, nlp_functions
from pipelines.nlp.perceptron import PerceptronTagger
from pipelines.nlp.tokenize import sent_tokenize, word_tokenize
from pipelines.nlp.training import (
    TaggerReport,
    ensure_tagger,
    load_tagger,
    sentence_boundary_f1,
    train_tagger,
)

__all__ = [
    "HeuristicTagger",
    "PerceptronTagger",
    "SpacyDisabledError",
    "Tagger",
    "TaggerReport",
    "ensure_tagger",
    "install",
    "installed_tagger",
    "load_tagger",
    "nlp_functions",
    "sent_tokenize",
    "sentence_boundary_f1",
    "train_tagger",
    "word_tokenize",
]
