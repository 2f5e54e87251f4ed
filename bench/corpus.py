"""Every file of the shared corpora (hostile samples and real documents) through the real API
and real worker processes: outcome per file type, time to a final state, peak memory.

    .venv/bin/python bench/corpus.py [--only hostile|docs] [--timeout 3600]
                                     [--env SLUICE_PARSE_LANGUAGES='["eng"]'] [--files-out F]

Embedded default (SQLite + filesystem broker) in a temporary data dir; workers as in
`tests/corpus_harness.py` (parse prefork 2, embed prefork 1, answer+maintenance prefork 1).
Prints a table per extension and per sniffed type, then one JSON line: `files`, `unique`,
`duplicates`, `succeeded`, `failed_by_code`, `unfinished`, `worker_deaths`,
`unexplained_worker_deaths`, `pool_replacements`, `peak_rss_mb` ({api, worker,
worker_max_child}), `max_job_s`, `health` ({probes, max_s, failures}), `wall_s`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import corpus_harness as harness  # noqa: E402
from tests.faults.harness import make_corpus  # noqa: E402
from tests.stack import Stack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=harness.CORPORA, help="one corpus only")
    parser.add_argument("--limit", type=int, help="every Nth file only (a smoke run)")
    parser.add_argument("--timeout", type=float, default=3600, help="for every job to end (s)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every process, e.g. SLUICE_PDF_STRATEGY=fast")
    parser.add_argument("--tagger-cache", type=Path, help="reuse a trained tagger from here")
    parser.add_argument("--files-out", type=Path, help="write one JSON line per file here")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args()

    from pipelines.nlp.training import ensure_tagger

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-corpus-"))
    stacks: list[Stack] = []
    try:
        tagger = ensure_tagger(harness.DATA / "nlp" / "ud-english-ewt",
                               args.tagger_cache or work / "nlp")
        env = {"SLUICE_DATA_DIR": str(work / "data"), "SLUICE_TAGGER_PATH": str(tagger),
               **dict(item.split("=", 1) for item in args.env)}
        harness.configure(env)
        files = harness.corpus_files([args.only] if args.only else harness.CORPORA)
        if args.limit:
            files = files[:: max(1, len(files) // args.limit)]
        control = make_corpus(work / "control", 1)[0]
        log(f"{len(files)} files; starting the API and workers")

        harness.start_stacks(harness.stack_factory(env, work / "logs", stacks))
        report = harness.run_corpus(stacks, files, control=control, timeout=args.timeout,
                                    progress=log)
    finally:
        for s in stacks:
            s.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.files_out:
        with args.files_out.open("w") as out:
            for o in [*report.outcomes, report.control]:
                out.write(json.dumps({
                    "file": o.rel, "sniffed": o.sniffed, "size": o.size, "result": o.result,
                    "duplicate": o.duplicate, "attempts": o.attempts, "chunks": o.chunks,
                    "seconds": None if o.seconds is None else round(o.seconds, 2),
                    "peak_child_mb": round(o.peak_child_mb), "message": o.message[:300],
                }) + "\n")
    print("\n".join(harness.table(report.outcomes, lambda o: o.ext, "extension")))
    print()
    print("\n".join(harness.table(report.outcomes, lambda o: o.sniffed, "sniffed type")))
    print()
    summary = report.summary()
    slowest = sorted((o for o in report.outcomes if o.seconds is not None),
                     key=lambda o: -(o.seconds or 0))[:8]
    print("slowest: " + ", ".join(f"{o.rel} {o.seconds:.0f}s ({o.result})" for o in slowest))
    for worker, lines in report.abnormal_exits.items():
        for line in lines:
            print(f"{worker}: pool child died: {line}")
    for death in report.watch.main_deaths:
        print(f"worker main process exited: {death}")
    for failure in report.health.failures:
        print(f"health probe failed: {failure}")
    for o in report.unfinished:
        print(f"unfinished: {o.rel} ({o.state})")
    summary["cpus"] = os.cpu_count()
    summary["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    summary["settings"] = dict(item.split("=", 1) for item in args.env)
    print(json.dumps(summary))
    ok = summary["unfinished"] == 0 and summary["unexplained_worker_deaths"] == 0
    return 0 if ok else 1


def log(line: str) -> None:
    print(f"[{time.strftime('%X')}] {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
