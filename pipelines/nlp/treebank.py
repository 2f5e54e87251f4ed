"""Reading a Universal Dependencies treebank (CoNLL-U) for Penn Treebank tags."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

TRAIN, DEV, TEST = "train", "dev", "test"


@dataclass(frozen=True, slots=True)
class TaggedSentence:
    """One treebank sentence: its surface text and its tokens with Penn (XPOS) tags."""

    text: str
    words: tuple[str, ...]
    tags: tuple[str, ...]
    starts_paragraph: bool


def split_path(treebank_dir: Path, split: str) -> Path:
    """The CoNLL-U file of one split (``train``, ``dev`` or ``test``) in ``treebank_dir``."""
    matches = sorted(treebank_dir.glob(f"*-ud-{split}.conllu"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one *-ud-{split}.conllu in {treebank_dir}: {matches}")
    return matches[0]


def read_conllu(path: Path) -> list[TaggedSentence]:
    """Read sentences from a CoNLL-U file, keeping syntactic words and their XPOS tags.

    Multi-word token ranges (``3-4 don't``) and empty nodes (``8.1``) are skipped: the
    syntactic words under them (``do``, ``n't``) carry the tags, as in the Penn Treebank.
    """
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    text = ""
    new_par = False
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if not line:
                if words:
                    sentences.append(TaggedSentence(text, tuple(words), tuple(tags), new_par))
                words, tags, text, new_par = [], [], "", False
            elif line.startswith("#"):
                if line.startswith("# text = "):
                    text = line[len("# text = ") :]
                elif line.startswith(("# newpar", "# newdoc")):
                    new_par = True
            else:
                cols = line.split("\t")
                if cols[0].isdigit():
                    words.append(cols[1])
                    tags.append(cols[4])
    if words:
        sentences.append(TaggedSentence(text, tuple(words), tuple(tags), new_par))
    return sentences


def treebank_fingerprint(treebank_dir: Path) -> str:
    """sha256 over the treebank's three splits: the cache key of a tagger trained on it."""
    digest = hashlib.sha256()
    for split in (TRAIN, DEV, TEST):
        path = split_path(treebank_dir, split)
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
