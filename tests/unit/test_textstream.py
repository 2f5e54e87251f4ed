"""Large plain text streams: decoded block by block, cut into lines, chunked, in bounded
memory; the encoding is detected and binary data named .txt is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import textstream
from pipelines.chunking import chunk_text_stream
from pipelines.errors import EmptyDocument, GarbageText
from tests.faults.harness import SCIFACT
from tests.stack import REPO


def _abstracts(count: int) -> list[str]:
    import json

    with SCIFACT.open() as fh:
        return [json.loads(line)["text"] for _, line in zip(range(count), fh, strict=False)]


def test_lines_survive_block_boundaries_and_multibyte_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(textstream, "BLOCK_BYTES", 7)  # every multibyte char gets split
    text = "première ligne\r\nzweite Zeile – ünïcødé\n\n第三行 with 🙂 emoji\nlast"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert list(textstream.iter_lines(path, encoding="utf-8")) == text.replace(
        "\r\n", "\n").split("\n")


def test_an_endless_line_is_cut_at_spaces(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    words = ("word " * 100_000).strip()  # 500,000 characters, no newline
    path.write_text(words)
    lines = list(textstream.iter_lines(path, encoding="utf-8"))
    assert len(lines) > 1
    assert max(len(line) for line in lines) <= textstream.MAX_LINE_CHARS
    assert " ".join(lines).split() == words.split()


@pytest.mark.parametrize(("encoding", "expected"), [
    ("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("utf-16", "utf-16"),
])
def test_detect_encoding(encoding: str, expected: str) -> None:
    sample = "Ça marche très bien, naïve façade. " * 50
    assert textstream.detect_encoding(sample.encode(encoding)) == expected


def test_detect_a_legacy_encoding() -> None:
    sample = ("Größere Änderungen für Übersetzer, schön und gemütlich. " * 40).encode("cp1252")
    encoding = textstream.detect_encoding(sample)
    assert sample.decode(encoding) == sample.decode("cp1252")


def test_chunk_file_matches_chunking_the_whole_text(tmp_path: Path) -> None:
    text = "\n\n".join(_abstracts(200))
    path = tmp_path / "abstracts.txt"
    path.write_text(text)
    streamed = [c.text for c in textstream.chunk_file(path, encoding="utf-8", max_words=160)]
    whole = [c.text for c in chunk_text_stream(text.splitlines(), max_words=160)]
    assert streamed == whole and len(streamed) > 100


def test_binary_named_txt_is_garbage(tmp_path: Path) -> None:
    path = tmp_path / "random.txt"
    path.write_bytes(os.urandom(200_000))
    encoding = textstream.detect_encoding(path.read_bytes()[: textstream.SAMPLE_BYTES])
    with pytest.raises(GarbageText):
        textstream.check_sample(path, filename="random.txt", encoding=encoding)


def test_blank_text_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\t\n" * 1000)
    with pytest.raises(EmptyDocument):
        textstream.check_sample(path, filename="blank.txt", encoding="utf-8")


def test_plain_text_detection(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain words\n" * 100)
    (tmp_path / "a.md").write_text("# Title\n\nplain words\n" * 100)
    (tmp_path / "b.txt").write_bytes(b"%PDF-1.7\n" + os.urandom(4000))
    assert textstream.is_plain_text(tmp_path / "a.txt", filename="a.txt")
    assert not textstream.is_plain_text(tmp_path / "a.md", filename="a.md")
    assert not textstream.is_plain_text(tmp_path / "b.txt", filename="b.txt")


def test_memory_is_independent_of_file_size(tmp_path: Path) -> None:
    """Chunking 96 MB of text in a fresh process raises its peak RSS by far less than the
    file's size (a warm-up over one copy of the text takes the one-off costs first)."""
    block = ("\n\n".join(_abstracts(300)) + "\n\n").encode()
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_bytes(block)
    with big.open("wb") as out:
        while out.tell() < 96 * 1024 * 1024:
            out.write(block)
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from pipelines.textstream import chunk_file
        def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sum(1 for _ in chunk_file(Path({str(small)!r}), encoding="utf-8", max_words=160))
        before = peak()
        chunks = sum(1 for _ in chunk_file(Path({str(big)!r}), encoding="utf-8", max_words=160))
        print(chunks, before, peak())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    chunks, before_kb, after_kb = map(int, out)
    assert chunks > 30_000
    assert (after_kb - before_kb) * 1024 < 24 * 1024 * 1024, (before_kb, after_kb)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "cp1252"])
def test_slices_resume_where_the_last_stopped_and_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str,
) -> None:
    """Slicing after every block: each slice ends at a paragraph end, the next starts there,
    and the slices' chunks hold exactly the whole file's words, in order."""
    monkeypatch.setattr(textstream, "BLOCK_BYTES", 4096)
    paragraphs = [f"Paragraph {n}: {text}" for n, text in enumerate(_abstracts(60))]
    if encoding != "cp1252":
        paragraphs[3] += " – naïve café 🙂"
    path = tmp_path / "t.txt"
    text = "\r\n\r\n".join(paragraphs[:30]) + "\n\n" + "\n\n".join(paragraphs[30:])
    path.write_bytes(text.encode(encoding, errors="replace"))
    detected = textstream.detect_encoding(path.read_bytes()[:65536])
    whole = list(textstream.chunk_file(path, encoding=detected, max_words=160))
    sliced: list[str] = []
    starts = [0]
    while True:
        slice_ = textstream.Slice()
        sliced += [c.text for c in textstream.chunk_file(
            path, encoding=detected, max_words=160, start=starts[-1],
            should_stop=lambda: True, slice_=slice_)]
        if slice_.next_offset is None:
            break
        assert slice_.next_offset > starts[-1]
        starts.append(slice_.next_offset)
    assert len(starts) > 5  # it did slice
    assert " ".join(sliced).split() == " ".join(c.text for c in whole).split()
    assert not any("\ufffd" in text for text in sliced)
