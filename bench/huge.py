"""Huge inputs through the real API and real workers: a large PDF and a 1 GB plain-text file,
with the peak RSS of the API and of every worker against the file's size.

    .venv/bin/python bench/huge.py [--only pdf|text] [--pdf-mb 200] [--text-mb 1024]
                                   [--embed-timeout 120] [--env KEY=VALUE ...]

Both files are generated into a temporary directory and deleted afterwards (with the data
dir: blobs, SQLite database):

- the PDF has as many pages as ``SLUICE_MAX_PDF_PAGES`` allows (2,000 by default), each with
  ``--pdf-lines`` lines of SciFact text in Helvetica and an uncompressed grey-noise image that
  pads the file to ``--pdf-mb`` (as scans do; the ``fast`` strategy extracts the text and skips
  the images). Hand-written PDF objects, streamed to disk.
- the text file is SciFact abstracts, repeated with their sentences reshuffled and each
  paragraph numbered, streamed to disk until ``--text-mb``.

Each file is uploaded alone (``SLUICE_MAX_UPLOAD_BYTES`` raised to fit; every other limit at
its default unless ``--env`` says otherwise) and followed until its parse stage ends (chunks
stored: the job moves to ``embed``) or fails. Embedding is measured, not waited for: after
``--embed-timeout`` seconds of embedding the rate so far (chunks/s) is extrapolated to the
document's chunk count and the job is cancelled (``--embed-timeout 0``: cancel as soon as
parsing is done; ``-1``: wait for the end). A worker process tree that passes ``--rss-abort-mb``
is killed (this bench's own processes only), so a runaway cannot take the machine down.

Prints one row per file, then one JSON line: per file ``size_mb``, ``upload_s``, ``parse_s``,
``result`` (``parsed``, a failure code, ``aborted``), ``chunks``, ``peak_rss_mb`` ({api,
parse_worker, parse_max_child, embed_worker}), ``rss_per_file_size`` (parse worker tree peak /
file size), ``growth_per_file_size`` (the same peak less the tree's idle RSS, / file size),
embedding ``chunks_per_s`` and ``embed_eta_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import corpus_harness as harness  # noqa: E402
from tests.stack import Stack  # noqa: E402

SCIFACT = harness.DATA / "scifact" / "corpus.jsonl"
MB = 1 << 20
POLL_S = 0.5
PSS_EVERY = 8  # samples (of 0.25 s): the trees' PSS every 2 s


# Generated inputs ---------------------------------------------------------------------------
def abstracts() -> list[str]:
    with SCIFACT.open() as fh:
        return [f"{r['title']}. {r['text']}" for r in map(json.loads, fh) if r["text"]]


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _wrap(text: str, width: int) -> Iterator[str]:
    line: list[str] = []
    size = 0
    for word in text.split():
        if size + len(word) > width and line:
            yield " ".join(line)
            line, size = [], 0
        line.append(word)
        size += len(word) + 1
    if line:
        yield " ".join(line)


def write_pdf(path: Path, *, pages: int, lines_per_page: int, target_bytes: int) -> dict[str, Any]:
    """A PDF of ``pages`` text pages, each padded by a noise image so the file reaches about
    ``target_bytes``. Objects: 1 catalog, 2 page tree, 3 font, then per page i: 4+3i page,
    5+3i content stream, 6+3i image."""
    rng = random.Random(1)
    lines = (_ascii(line) for text in abstracts() for line in _wrap(text, 95))
    offsets: dict[int, int] = {}
    text_chars = 0
    with path.open("wb") as out:
        def obj(number: int, body: bytes, stream: bytes | None = None) -> None:
            offsets[number] = out.tell()
            out.write(f"{number} 0 obj\n".encode() + body)
            if stream is not None:
                out.write(b"\nstream\n" + stream + b"\nendstream")
            out.write(b"\nendobj\n")

        out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
        obj(3, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
               b"/Encoding /WinAnsiEncoding >>")
        image_side = 0
        for i in range(pages):
            page_lines = []
            for _ in range(lines_per_page):
                try:
                    page_lines.append(next(lines))
                except StopIteration:
                    lines = (_ascii(line) for text in abstracts() for line in _wrap(text, 95))
                    page_lines.append(next(lines))
            text_chars += sum(len(x) for x in page_lines)
            escaped = [x.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
                       for x in page_lines]
            content = ("BT /F1 9 Tf 12 TL 40 790 Td\n"
                       + "\n".join(f"({x}) Tj T*" for x in escaped)
                       + "\nET\nq 60 0 0 60 500 30 cm /Im1 Do Q").encode("latin-1")
            if i == 0:  # size the image so the whole file reaches the target
                room = target_bytes - out.tell() - pages * (len(content) + 400)
                image_side = max(1, int((max(0, room) / pages) ** 0.5))
            first = 4 + 3 * i
            obj(first, (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] "
                        f"/Contents {first + 1} 0 R /Resources << /Font << /F1 3 0 R >> "
                        f"/XObject << /Im1 {first + 2} 0 R >> >> >>").encode())
            obj(first + 1, f"<< /Length {len(content)} >>".encode(), content)
            noise = rng.randbytes(image_side * image_side)
            obj(first + 2, (f"<< /Type /XObject /Subtype /Image /Width {image_side} "
                            f"/Height {image_side} /ColorSpace /DeviceGray "
                            f"/BitsPerComponent 8 /Length {len(noise)} >>").encode(), noise)
        kids = " ".join(f"{4 + 3 * i} 0 R" for i in range(pages))
        obj(2, f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
        xref = out.tell()
        count = 4 + 3 * pages
        out.write(f"xref\n0 {count}\n0000000000 65535 f \n".encode())
        for number in range(1, count):
            out.write(f"{offsets[number]:010d} 00000 n \n".encode())
        out.write(f"trailer\n<< /Size {count} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
                  .encode())
    return {"pages": pages, "text_chars": text_chars, "image_px": image_side ** 2}


def write_text(path: Path, *, target_bytes: int) -> dict[str, Any]:
    """SciFact abstracts, pass after pass with sentences reshuffled and paragraphs numbered,
    until ``target_bytes``."""
    rng = random.Random(2)
    source = [re.split(r"(?<=[.!?])\s+", text) for text in abstracts()]
    written = paragraphs = 0
    with path.open("w", encoding="utf-8") as out:
        while written < target_bytes:
            batch = []
            for sentences in source:
                shuffled = sentences[:]
                rng.shuffle(shuffled)
                paragraphs += 1
                batch.append(f"{paragraphs}. " + " ".join(shuffled) + "\n\n")
            block = "".join(batch)
            out.write(block)
            written += len(block.encode("utf-8"))
    return {"paragraphs": paragraphs}


# One file through the stack -----------------------------------------------------------------
def ingest(stacks: list[Stack], watch: harness.ProcessWatch, path: Path, *,
           embed_timeout: float, timeout: float, rss_abort_mb: float) -> dict[str, Any]:
    from sqlalchemy import select

    from models import Job
    from sluice.db import session_scope

    api = stacks[0]
    size = path.stat().st_size
    row: dict[str, Any] = {"file": path.name, "size_mb": round(size / MB, 1)}
    t0 = time.time()
    resp = api.upload(path)
    row["upload_s"] = round(time.time() - t0, 1)
    row["upload_status"] = resp.status_code
    if resp.status_code != 202:
        row["result"] = f"refused: {resp.json()['error']['code']}"
        row["peak_rss_mb"] = {"api": round(watch.peaks(t0)["api"])}
        return row
    job_id, document_id = resp.json()["job_id"], resp.json()["document_id"]
    parse_start = time.time()
    parse_end = embed_start = None
    embedded_progress = None
    embedded_at_start = 0
    result = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        if watch.peaks(time.time() - 2, workers=("parse",))["worker"] > rss_abort_mb:
            _abort(stacks)
            result = "aborted"
            break
        with session_scope() as session:
            job = session.get_one(Job, job_id)
            state, stage, progress = job.state, job.stage, job.progress
            error = job.error_code
        if (stage == "embed" or state in harness.FINAL) and parse_end is None:
            chunks = _chunks(document_id)
        if stage == "embed" and parse_end is None:
            parse_end = embed_start = time.time()
            row["parse_s"] = round(parse_end - parse_start, 1)
            row["chunks"] = chunks
            log(f"{path.name}: parsed into {chunks} chunks in {row['parse_s']}s")
            result = "parsed"
            embedded_at_start = _embedded(document_id)
            if embed_timeout == 0:
                break
        if state in harness.FINAL:
            result = "succeeded" if state == "succeeded" else error or state
            if parse_end is None:
                row["parse_s"] = round(time.time() - parse_start, 1)
            if state == "succeeded":
                row["embed_s"] = round(time.time() - (embed_start or parse_start), 1)
                row["chunks"] = _chunks(document_id)
            break
        if embed_start is not None and 0 < embed_timeout < time.time() - embed_start:
            embedded_progress = (progress, time.time() - embed_start)
            break
    else:
        result = f"unfinished after {timeout:.0f}s"
    row["result"] = result
    if embedded_progress is not None and row.get("chunks"):
        done, seconds = _embedded(document_id) - embedded_at_start, embedded_progress[1]
        row["embedded_chunks"] = done
        row["chunks_per_s"] = round(done / seconds, 1) if seconds else None
        row["embed_eta_s"] = round(row["chunks"] / (done / seconds)) if done else None
    with session_scope() as session:
        still_running = session.scalar(select(Job.state).where(Job.id == job_id)) not in \
            harness.FINAL
    if still_running and result != "aborted":
        with api.client() as client:
            client.post(f"/v1/jobs/{job_id}/cancel")
        api.wait_jobs([job_id], timeout=600)
    parse_peaks = watch.peaks(parse_start, parse_end or time.time(), ("parse",))
    row["peak_rss_mb"] = {
        "api": round(watch.peaks(t0)["api"]),
        "parse_worker": round(parse_peaks["worker"]),
        "parse_max_child": round(parse_peaks["worker_max_child"]),
        "parse_worker_pss": round(parse_peaks["worker_pss"]),
        "embed_worker": round(watch.peaks(parse_start, workers=("embed",))["worker"]),
    }
    row["rss_per_file_size"] = round(parse_peaks["worker"] * MB / size, 2)
    return row


def _chunks(document_id: str) -> int:
    """The document's stored chunks (its chunk_count is only final once it is ready)."""
    from sqlalchemy import func, select

    from models import Chunk
    from sluice.db import session_scope

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Chunk)
                                  .where(Chunk.document_id == document_id)) or 0)


def _embedded(document_id: str) -> int:
    """Chunks of the document that have their vector (whatever the job reports)."""
    from sqlalchemy import func, select

    from models import Chunk
    from sluice.db import session_scope

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Chunk).where(
            Chunk.document_id == document_id, Chunk.embedding_version.is_not(None))) or 0)


def _abort(stacks: list[Stack]) -> None:
    """SIGKILL the parse worker's processes (started by this bench) before the machine runs
    out of memory."""
    import psutil

    for s in stacks:
        proc = s.procs.get("parse")
        if proc is None:
            continue
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("pdf", "text"))
    parser.add_argument("--pdf-mb", type=float, default=200)
    parser.add_argument("--pdf-lines", type=int, default=20, help="text lines per PDF page")
    parser.add_argument("--text-mb", type=float, default=1024)
    parser.add_argument("--embed-timeout", type=float, default=120)
    parser.add_argument("--timeout", type=float, default=3600, help="per file, until parsed")
    parser.add_argument("--rss-abort-mb", type=float, default=12_000)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tagger-cache", type=Path)
    parser.add_argument("--workdir", type=Path, help="where the temporary dir goes")
    args = parser.parse_args()

    from pipelines.nlp.training import ensure_tagger
    from sluice.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-huge-", dir=args.workdir))
    stacks: list[Stack] = []
    rows: list[dict[str, Any]] = []
    try:
        extra = dict(item.split("=", 1) for item in args.env)
        max_pages = Settings.model_fields["max_pdf_pages"].default
        if "SLUICE_MAX_PDF_PAGES" in extra:
            max_pages = int(extra["SLUICE_MAX_PDF_PAGES"])
        inputs: list[tuple[Path, dict[str, Any]]] = []
        if args.only in (None, "pdf"):
            pdf = work / "huge.pdf"
            t = time.monotonic()
            info = write_pdf(pdf, pages=max_pages or 2000, lines_per_page=args.pdf_lines,
                             target_bytes=int(args.pdf_mb * MB))
            log(f"wrote {pdf.name}: {pdf.stat().st_size / MB:.0f} MB, {info} "
                f"in {time.monotonic() - t:.0f}s")
            inputs.append((pdf, info))
        if args.only in (None, "text"):
            text = work / "huge.txt"
            t = time.monotonic()
            info = write_text(text, target_bytes=int(args.text_mb * MB))
            log(f"wrote {text.name}: {text.stat().st_size / MB:.0f} MB, {info} "
                f"in {time.monotonic() - t:.0f}s")
            inputs.append((text, info))
        largest = max(p.stat().st_size for p, _ in inputs)
        tagger = ensure_tagger(harness.DATA / "nlp" / "ud-english-ewt",
                               args.tagger_cache or work / "nlp")
        env = {"SLUICE_DATA_DIR": str(work / "data"), "SLUICE_TAGGER_PATH": str(tagger),
               "SLUICE_MAX_UPLOAD_BYTES": str(largest + 64 * MB), **extra}
        harness.configure(env)

        harness.start_stacks(harness.stack_factory(env, work / "logs", stacks))
        watch = harness.ProcessWatch(stacks, pss_every=PSS_EVERY)
        watch.sample()
        idle = watch.peaks()
        idle_parse = watch.peaks(workers=("parse",))["worker"]
        watch.start()
        for path, info in inputs:
            log(f"ingesting {path.name}")
            row = ingest(stacks, watch, path, embed_timeout=args.embed_timeout,
                         timeout=args.timeout, rss_abort_mb=args.rss_abort_mb)
            row.update(info)
            default_limit = Settings.model_fields["parse_soft_time_limit_s"].default
            if row.get("parse_s") is not None and default_limit is not None:
                row["parse_over_default_soft_limit"] = row["parse_s"] > default_limit
            if "parse_worker" in row.get("peak_rss_mb", {}):
                growth = row["peak_rss_mb"]["parse_worker"] - idle_parse
                row["parse_worker_growth_mb"] = round(growth)
                row["growth_per_file_size"] = round(growth * MB / path.stat().st_size, 3)
            rows.append(row)
            log(json.dumps(row))
            if row["result"] == "aborted":
                break
        watch.stop()
        deaths = [d.name for d in watch.main_deaths]
        logs = {n: s.log(n) for s in stacks for n in s.procs}
    finally:
        for s in stacks:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    header = ("file", "MB", "upload s", "parse s", "result", "chunks", "API MB",
              "parse worker MB", "parse child MB", "RSS/size", "growth/size", "embed chunks/s",
              "embed ETA s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        peaks = r.get("peak_rss_mb", {})
        print(" | ".join(str(v) for v in (
            r["file"], r["size_mb"], r["upload_s"], r.get("parse_s", "-"), r["result"],
            r.get("chunks", "-"), peaks.get("api", "-"), peaks.get("parse_worker", "-"),
            peaks.get("parse_max_child", "-"), r.get("rss_per_file_size", "-"),
            r.get("growth_per_file_size", "-"), r.get("chunks_per_s", "-"),
            r.get("embed_eta_s", "-"))))
    errors = {n: [line for line in text.splitlines() if " ERROR" in line][-3:]
              for n, text in logs.items()}
    for name, lines in errors.items():
        for line in lines:
            print(f"{name}: {line[:300]}")
    print(json.dumps({
        "files": rows,
        "idle_rss_mb": {k: round(v) for k, v in idle.items()},
        "worker_main_deaths": deaths,
        "settings": {k: v for k, v in env.items() if k not in ("SLUICE_DATA_DIR",
                                                               "SLUICE_TAGGER_PATH")},
        "cpus": os.cpu_count(), "loadavg": [round(x, 1) for x in os.getloadavg()],
    }))
    return 0


def log(line: str) -> None:
    print(f"[{time.strftime('%X')}] {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
