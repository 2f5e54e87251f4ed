"""Request and response bodies (they feed the OpenAPI spec at /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    created_at: datetime
    updated_at: datetime
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
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    request_id: str | None = Field(
        default=None, description="The X-Request-ID of the request that created the job: grep "
        "the logs for it to follow the job through every stage.")
    parts: PartsOut | None = Field(
        default=None, description="Set on a job split into parts (state `waiting` while they "
        "run); list them with `GET /v1/jobs?parent=ID`.")
    parent_id: str | None = Field(default=None, description="Set on a part: the job it is "
                                  "a part of.")


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
