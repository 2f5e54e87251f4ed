"""Every file of the shared corpora through the real API and real worker processes; shared by
tests/integration/test_corpus.py (asserts) and bench/corpus.py (reports).

The corpora are ``../shared/data/hostile`` (zip and XML bombs, hostile Office files) and
``../shared/data/docs`` (real, messy documents: unstructured's example docs, pypdf's test
PDFs); the data folders' own files (``_manifest.tsv``, ``_LICENSE``, ...) are left out.

While the files run, two threads watch: a ``ProcessWatch`` samples the RSS of the API and of
every worker process tree (main process, pool children, sandboxed parse children) with psutil,
notices a worker main process that exits and records every pool child pid it ever sees; a
``HealthProbe`` asks ``/healthz`` every 0.5 s and keeps the slowest answer and every failure.
Afterwards the worker logs say which pool children died abnormally (billiard logs an exit
other than a normal one or a max-tasks-per-child recycle), and the job ledger's attempts say
which of those a hard time limit explains.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import select

from models import Job, JobAttempt
from sluice.db import session_scope
from tests.stack import FINAL, Stack

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CORPORA = ("hostile", "docs")
MB = 1 << 20

# (worker name, queues, prefork concurrency): the embedded default's pools, one worker each.
WORKERS: tuple[tuple[str, str, int], ...] = (
    ("parse", "parse", 2),
    ("embed", "embed", 1),
    ("answer-maintenance", "answer,maintenance", 1),
)
SAMPLE_INTERVAL_S = 0.25
HEALTH_INTERVAL_S = 0.5
_ABNORMAL_EXIT = re.compile(r"Process '([^']+)' pid:(\d+) exited with '([^']+)'")
# The worker's main process records a child killed by its hard time limit (workers/signals.py).
_KILLED = " was killed: TimeLimitExceeded"


# The corpus --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusFile:
    rel: str  # relative to DATA: "hostile/zip/zbsm.zip"
    path: Path
    size: int
    sha256: str
    sniffed: str  # libmagic's MIME type

    @property
    def ext(self) -> str:
        return self.path.suffix.lower() or "(none)"


def corpus_files(only: Iterable[str] = CORPORA, *, data: Path = DATA) -> list[CorpusFile]:
    """Every file under the named corpora, sorted, except the data folders' own files
    (names starting with ``_``: manifests, licenses, notes on what is missing)."""
    import magic

    files = []
    for corpus in only:
        for path in sorted((data / corpus).rglob("*")):
            if not path.is_file() or path.name.startswith("_"):
                continue
            body = path.read_bytes()
            files.append(CorpusFile(
                rel=str(path.relative_to(data)), path=path, size=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                sniffed=magic.from_buffer(body[:65536], mime=True) if body else "(empty)",
            ))
    return files


# The processes ------------------------------------------------------------------------------
def stack_factory(env: dict[str, str], log_dir: Path,
                  started: list[Stack]) -> Callable[..., Stack]:
    """A `start_stacks` factory for scripts: each Stack is added to `started` before it
    starts, so the caller can stop whatever did start if a later one fails."""
    def factory(**kwargs: object) -> Stack:
        s = Stack(env=env, log_dir=log_dir, **kwargs)  # type: ignore[arg-type]
        started.append(s)
        s.start()
        return s

    return factory


def start_stacks(factory: Callable[..., Stack]) -> list[Stack]:
    """The API (with the parse worker's stack) and one worker per entry of ``WORKERS``.
    ``factory(**kwargs)`` builds and starts a ``Stack`` (the test's fixture, or the bench's)."""
    stacks = []
    for i, (name, queues, concurrency) in enumerate(WORKERS):
        s = factory(queues=queues, concurrency=concurrency, workers=0, api=i == 0)
        s.start_worker(name)
        stacks.append(s)
    for s in stacks:
        s.wait_ready()
    return stacks


def _worker_names(stack: Stack) -> list[str]:
    return [n for n in stack.procs if n not in ("api", "beat")]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _pss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


@dataclass
class Sample:
    t: float  # time.time()
    api: int
    trees: dict[str, tuple[int, int]]  # worker -> (sum over its process tree, largest single)
    pss: dict[str, int] = field(default_factory=dict)  # worker -> PSS of its tree, when taken


@dataclass
class WorkerDeath:
    name: str
    returncode: int | None
    at: float


class ProcessWatch(threading.Thread):
    """Samples RSS every ``SAMPLE_INTERVAL_S``; records every pool child pid and any worker
    main process that exits."""

    def __init__(self, stacks: list[Stack], *, pss_every: int = 0) -> None:
        """``pss_every=N``: every Nth sample also takes the proportional set size of each
        tree (shared pages counted once across its processes; reading smaps costs more)."""
        super().__init__(daemon=True, name="process-watch")
        self.pss_every = pss_every
        self.api = stacks[0].procs["api"]
        self.workers = {n: s.procs[n] for s in stacks for n in _worker_names(s)}
        self.samples: list[Sample] = []
        self.initial_pool: dict[str, set[int]] = {n: self._pool(p.pid) for n, p in
                                                  self.workers.items()}
        self.pool_seen: dict[str, set[int]] = {n: set(p) for n, p in self.initial_pool.items()}
        self.main_deaths: list[WorkerDeath] = []
        self.stop_event = threading.Event()

    @staticmethod
    def _pool(pid: int) -> set[int]:
        try:
            return {c.pid for c in psutil.Process(pid).children()}
        except psutil.NoSuchProcess:
            return set()

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        trees, pss = {}, {}
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                if not any(d.name == name for d in self.main_deaths):
                    self.main_deaths.append(WorkerDeath(name, proc.returncode, time.time()))
                continue
            self.pool_seen[name] |= self._pool(proc.pid)
            tree = _tree(proc.pid)
            sizes = [_rss(p) for p in tree]
            trees[name] = (sum(sizes), max(sizes[1:], default=0))
            if self.pss_every and len(self.samples) % self.pss_every == 0:
                pss[name] = sum(map(_pss, tree))
        self.samples.append(Sample(t=time.time(), api=sum(map(_rss, _tree(self.api.pid))),
                                   trees=trees, pss=pss))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.sample()

    def replacements(self) -> dict[str, int]:
        """Pool children that were started after the first ones, per worker."""
        return {n: len(self.pool_seen[n] - self.initial_pool[n]) for n in self.workers}

    def peaks(self, start: float = 0.0, end: float = float("inf"),
              workers: Iterable[str] | None = None) -> dict[str, float]:
        """Peak RSS (MB) in [start, end]: the API; every worker's tree summed; the largest
        single pool or sandbox child; the trees' PSS (0 unless ``pss_every``)."""
        names = set(workers) if workers is not None else set(self.workers)
        window = [s for s in self.samples if start <= s.t <= end]
        return {
            "api": max((s.api for s in window), default=0) / MB,
            "worker": max((sum(v[0] for n, v in s.trees.items() if n in names)
                           for s in window), default=0) / MB,
            "worker_max_child": max((v[1] for s in window for n, v in s.trees.items()
                                     if n in names), default=0) / MB,
            "worker_pss": max((sum(v for n, v in s.pss.items() if n in names)
                               for s in window), default=0) / MB,
        }


class HealthProbe(threading.Thread):
    """``GET /healthz`` every ``HEALTH_INTERVAL_S``: the slowest answer and every failure."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        super().__init__(daemon=True, name="health-probe")
        self.url, self.timeout = f"{url}/healthz", timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self.stop_event.wait(HEALTH_INTERVAL_S):
                started = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as exc:
                    self.failures.append(f"{time.strftime('%X')} {type(exc).__name__}: {exc}")
                    continue
                self.latencies.append(time.monotonic() - started)
                if status != 200:
                    self.failures.append(f"{time.strftime('%X')} HTTP {status}")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=self.timeout + 5)

    @property
    def max_s(self) -> float:
        return max(self.latencies, default=0.0)


# One run ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What became of one uploaded file."""

    rel: str
    ext: str
    sniffed: str
    size: int
    http_status: int
    duplicate: bool = False
    job_id: str | None = None
    state: str | None = None  # None: never reached a final state
    code: str | None = None  # the job's error code, or the upload's when it was refused
    message: str = ""
    attempts: int = 0
    chunks: int | None = None
    seconds: float | None = None  # upload → final state (the job's created_at → finished_at)
    peak_child_mb: float = 0.0  # largest parse/embed child RSS sampled during its attempts

    @property
    def result(self) -> str:
        """``succeeded``, the failure's code, or the unfinished state."""
        if self.state == "succeeded":
            return "succeeded"
        if self.state in FINAL or self.state == "refused":
            return self.code or self.state
        return f"unfinished ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state in FINAL or self.state == "refused"


@dataclass
class CorpusReport:
    outcomes: list[Outcome]
    control: Outcome  # the normal document uploaded in the middle of the corpus
    wall_s: float
    watch: ProcessWatch
    health: HealthProbe
    # worker -> billiard's lines on pool children that exited abnormally (from its log)
    abnormal_exits: dict[str, list[str]] = field(default_factory=dict)
    hard_limit_kills: int = 0  # attempts the worker recorded as killed by its hard limit
    attempt_codes: Counter[str] = field(default_factory=Counter)  # every failed attempt
    attempts_by_worker: Counter[str] = field(default_factory=Counter)  # by worker name

    @property
    def unfinished(self) -> list[Outcome]:
        return [o for o in [*self.outcomes, self.control] if not o.finished]

    @property
    def pool_deaths(self) -> int:
        return sum(len(lines) for lines in self.abnormal_exits.values())

    @property
    def worker_deaths(self) -> int:
        """Worker main processes that exited, plus pool children that died abnormally."""
        return len(self.watch.main_deaths) + self.pool_deaths

    @property
    def unexplained_deaths(self) -> int:
        """Deaths no hard time limit recorded in the attempts explains."""
        return len(self.watch.main_deaths) + max(0, self.pool_deaths - self.hard_limit_kills)

    def summary(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if o.job_id is not None]
        failed = Counter(o.result for o in self.outcomes
                         if o.finished and o.state != "succeeded")
        peaks = self.watch.peaks()
        return {
            "files": len(self.outcomes),
            "unique": sum(1 for o in done if not o.duplicate),
            "duplicates": sum(1 for o in self.outcomes if o.duplicate),
            "succeeded": sum(1 for o in self.outcomes if o.state == "succeeded"),
            "failed_by_code": dict(sorted(failed.items())),
            "unfinished": len(self.unfinished),
            "control_document": self.control.result,
            "worker_deaths": self.worker_deaths,
            "unexplained_worker_deaths": self.unexplained_deaths,
            "pool_replacements": self.watch.replacements(),
            "hard_limit_kills": self.hard_limit_kills,
            "failed_attempts_by_code": dict(sorted(self.attempt_codes.items())),
            "peak_rss_mb": {k: round(v) for k, v in peaks.items() if v or k != "worker_pss"},
            "max_job_s": round(max((o.seconds or 0 for o in done), default=0), 1),
            "health": {"probes": len(self.health.latencies),
                       "max_s": round(self.health.max_s, 3),
                       "failures": len(self.health.failures)},
            "wall_s": round(self.wall_s, 1),
        }


def _as_epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _upload(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post("/v1/documents", files={"file": (path.name, fh)})


def run_corpus(
    stacks: list[Stack],
    files: list[CorpusFile],
    *,
    control: Path,
    timeout: float,
    progress: Callable[[str], None] = lambda _line: None,
) -> CorpusReport:
    """Upload every file (and ``control``, a normal document, half-way through), wait until
    every job is final or ``timeout`` passes, and gather what happened."""
    api = stacks[0]
    watch, health = ProcessWatch(stacks), HealthProbe(api.url)
    watch.start()
    health.start()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    control_outcome: Outcome | None = None
    try:
        with api.client() as client:
            for i, f in enumerate(files):
                if i == len(files) // 2:
                    control_outcome = _outcome_of_upload(
                        _upload(client, control), rel=f"(control) {control.name}",
                        ext=control.suffix, sniffed="text/plain", size=control.stat().st_size)
                outcomes.append(_outcome_of_upload(_upload(client, f.path), rel=f.rel,
                                                   ext=f.ext, sniffed=f.sniffed, size=f.size))
        assert control_outcome is not None, "no files"
        progress(f"uploaded {len(files)} files in {time.monotonic() - started:.0f}s")
        job_ids = sorted({o.job_id for o in [*outcomes, control_outcome] if o.job_id})
        _wait(job_ids, deadline=started + timeout, progress=progress)
    finally:
        health.stop()
        watch.stop()
    report = CorpusReport(outcomes=outcomes, control=control_outcome, watch=watch,
                          health=health, wall_s=time.monotonic() - started)
    _fill_from_ledger(api, report)
    for s in stacks:
        for name in _worker_names(s):
            report.abnormal_exits[name] = [m.group(0) for m in _ABNORMAL_EXIT.finditer(s.log(name))]
    return report


def _outcome_of_upload(resp: httpx.Response, **fields: Any) -> Outcome:
    outcome = Outcome(http_status=resp.status_code, **fields)
    body = resp.json()
    if resp.status_code in (200, 202):
        outcome.job_id = body["job_id"]
        outcome.duplicate = bool(body.get("duplicate"))
    else:  # refused at the door: the API's error code
        outcome.state, outcome.code = "refused", body["error"]["code"]
        outcome.message = body["error"]["message"]
    return outcome


def _wait(job_ids: list[str], *, deadline: float, progress: Callable[[str], None]) -> None:
    last_report = 0.0
    while True:
        with session_scope() as session:
            states = Counter(session.scalars(select(Job.state).where(Job.id.in_(job_ids))))
        pending = len(job_ids) - sum(n for s, n in states.items() if s in FINAL)
        now = time.monotonic()
        if pending == 0 or now > deadline:
            return
        if now - last_report > 30:
            progress(f"{pending} of {len(job_ids)} jobs not final: {dict(states)}")
            last_report = now
        time.sleep(1.0)


def _fill_from_ledger(api: Stack, report: CorpusReport) -> None:
    """Each job's final state and error from the API; times and attempts from the ledger."""
    every = [*report.outcomes, report.control]
    job_ids = sorted({o.job_id for o in every if o.job_id})
    with session_scope() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        # Every attempt of the run, the part jobs of a split PDF included.
        attempts = session.scalars(select(JobAttempt).order_by(JobAttempt.id)).all()
        times = {j.id: (_as_epoch(j.created_at), _as_epoch(j.finished_at)) for j in jobs.values()}
        windows: dict[str, list[tuple[float, float]]] = {}
        for a in attempts:
            begin = _as_epoch(a.started_at) or 0.0
            windows.setdefault(a.job_id, []).append((begin, _as_epoch(a.ended_at) or time.time()))
            if a.error_code:
                report.attempt_codes[a.error_code] += 1
            if a.error_message and _KILLED in a.error_message:
                report.hard_limit_kills += 1
            report.attempts_by_worker[(a.worker or "?").split("@")[0]] += 1
    with api.client() as client:
        finals = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids}
    for o in every:
        if o.job_id is None:
            continue
        job = finals[o.job_id]
        o.state, o.attempts = job["state"], job["attempts"]
        if job["error"]:
            o.code, o.message = job["error"]["code"], job["error"]["message"]
        o.chunks = (job.get("result") or {}).get("chunks")
        created, finished = times.get(o.job_id, (None, None))
        if created is not None and finished is not None and not o.duplicate:
            o.seconds = finished - created
        o.peak_child_mb = max((report.watch.peaks(b, e, ("parse", "embed"))["worker_max_child"]
                               for b, e in windows.get(o.job_id, [])), default=0.0)


# Reporting -----------------------------------------------------------------------------------
def table(outcomes: list[Outcome], key: Callable[[Outcome], str], title: str) -> list[str]:
    """A Markdown table of the outcomes grouped by ``key``."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(key(o), []).append(o)
    header = (title, "files", "dup", "succeeded", "failed (by code)", "unfinished", "max s",
              "peak child MB")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name in sorted(groups):
        group = groups[name]
        failed = Counter(o.result for o in group if o.finished and o.state != "succeeded")
        unfinished = sum(1 for o in group if not o.finished)
        seconds = [o.seconds for o in group if o.seconds is not None]
        lines.append(" | ".join(str(v) for v in (
            name, len(group), sum(o.duplicate for o in group),
            sum(o.state == "succeeded" for o in group),
            ", ".join(f"{c} {n}" for c, n in sorted(failed.items())) or "-", unfinished,
            f"{max(seconds):.1f}" if seconds else "-",
            f"{max(o.peak_child_mb for o in group):.0f}",
        )))
    return lines


def configure(env: dict[str, str]) -> None:
    """Make this process use ``env`` (the subprocesses get it from their ``Stack``): drop the
    shell's SLUICE_* settings, apply ``env``, migrate the database. For the benches; the test
    uses the ``sluice_env`` fixture."""
    import os

    from sluice import migrate
    from sluice.db import dispose_engine, get_engine
    from sluice.settings import get_settings
    from workers.app import reconfigure

    for key in [k for k in os.environ if k.startswith("SLUICE_")]:
        del os.environ[key]
    os.environ.update(env)
    get_settings.cache_clear()
    dispose_engine()
    migrate.upgrade(get_engine())
    reconfigure()
