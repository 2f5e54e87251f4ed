"""Request and response bodies (they feed the OpenAPI spec at /docs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from models.keys import Role


def as_utc(value: datetime) -> datetime:
    """Times are stored in UTC; SQLite hands them back without a zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDateTime = Annotated[datetime, AfterValidator(as_utc)]
"""A response time, always with its offset (RFC 3339 `date-time`)."""


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorInfo


class UploadAccepted(BaseModel):
    document_id: str
    job_id: str
    duplicate: bool = False


class DocumentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    workspace_id: str
    filename: str
    content_type: str | None
    sha256: str
    size_bytes: int
    status: str
    error: ErrorInfo | None = None
    page_count: int | None
    chunk_count: int
    created_at: UtcDateTime
    updated_at: UtcDateTime
    job_id: str | None = None


class DocumentList(BaseModel):
    documents: list[DocumentOut]
    total: int
    limit: int
    offset: int


class PartsOut(BaseModel):
    """A job split into parts (a large PDF, a job per page range): how many are done."""

    total: int
    done: int
    failed: int


class JobOut(BaseModel):
    id: str
    kind: str
    state: str
    stage: str
    attempts: int
    progress: float
    document_id: str | None
    error: ErrorInfo | None
    result: dict[str, Any] | None
    created_at: UtcDateTime
    updated_at: UtcDateTime
    finished_at: UtcDateTime | None
    request_id: str | None = Field(
        default=None, description="The X-Request-ID of the request that created the job: grep "
        "the logs for it to follow the job through every stage.")
    parts: PartsOut | None = Field(
        default=None, description="Set on a job split into parts (state `waiting` while they "
        "run); list them with `GET /v1/jobs?parent=ID`.")
    parent_id: str | None = Field(default=None, description="Set on a part: the job it is "
                                  "a part of.")
    held: bool = Field(
        default=False, description="Queued but held back: its workspace has as many jobs in "
        "flight as its cap allows (`SLUICE_WORKSPACE_INFLIGHT_CAP`, answers "
        "`SLUICE_WORKSPACE_ANSWER_INFLIGHT_CAP`); it is published, oldest first, as they end.")


class AnswerRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=50)


class JobAccepted(BaseModel):
    job_id: str


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=10, ge=1, le=100)
    mode: Literal["hybrid", "dense", "fulltext"] = "hybrid"


class SearchHit(BaseModel):
    chunk_id: int
    document_id: str
    filename: str
    page: int | None
    text: str
    score: float


class SearchResults(BaseModel):
    query: str
    results: list[SearchHit]


# API keys, quotas ------------------------------------------------------------------------

WORKSPACE_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class KeyCreate(BaseModel):
    role: Role
    name: str | None = Field(default=None, max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$",
                             description="A label for people (no control characters).")
    rate_limit: str | None = Field(
        default=None, max_length=64, description="Requests this key may make, a moving window "
        "such as `100/minute` or `10/second`; default SLUICE_RATE_LIMIT_PER_KEY.")

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse

            parse(value)  # ValueError → 422
        return value


class AdminKeyCreate(KeyCreate):
    workspace: str = Field(pattern=WORKSPACE_PATTERN)


class KeyOut(BaseModel):
    id: str
    workspace: str
    role: Role
    name: str | None
    rate_limit: str | None
    created_at: UtcDateTime
    last_used_at: UtcDateTime | None
    revoked_at: UtcDateTime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself, shown this once: only its hash is kept.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class QuotaValues(BaseModel):
    """Per-workspace limits; null is unlimited (in `limits`) or the default (in `overrides`)."""

    documents: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stored_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)
    queued_jobs: int | None = Field(default=None, ge=0, le=INT32_MAX,
                                    description="Unfinished jobs")
    answers_per_minute: int | None = Field(default=None, ge=0, le=INT32_MAX)


class UsageOut(BaseModel):
    documents: int
    stored_bytes: int
    queued_jobs: int


class QuotaOut(BaseModel):
    workspace: str
    limits: QuotaValues
    overrides: QuotaValues
    usage: UsageOut


class CallerOut(BaseModel):
    workspace: str
    role: Role
    key_id: str | None = Field(description="null with auth off")
    quota: QuotaOut
