"""Documents: upload (streamed to the blob store while hashing), list, read, delete."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from api.deps import (
    SessionDep,
    WorkspaceDep,
    WriterWorkspaceDep,
    default_quota,
    ensure_workspace,
)
from api.errors import ApiError, not_found
from api.group_commit import GroupCommit
from api.schemas import DocumentList, DocumentOut, ErrorBody, ErrorInfo, UploadAccepted
from api.state import blob_store, dispatch_held, publish_job
from api.uploads import FILE_FIELD, FORM_FIELDS_MAX_BYTES, MultipartUpload, clean_filename
from models import Document, Job, JobKind, Stage, documents, fairness, ledger, quotas
from sluice.blobs import BlobTooLarge, StoredBlob
from sluice.db import read_scope, session_scope
from sluice.logs import bind_context, current_request_id
from sluice.settings import get_settings

router = APIRouter(prefix="/v1/documents", tags=["documents"])
log = logging.getLogger(__name__)

BODY_OVERHEAD = FORM_FIELDS_MAX_BYTES + 64 * 1024
"""Multipart framing and small form fields tolerated on top of the upload limit."""
SMALL_BODY_BYTES = 256 * 1024
"""A body announced this small is read whole before anything else, then checked against the
quotas and stored in the upload's transaction: one thread hand-off and one transaction,
where a larger one is checked first (a refused upload is not read), then streamed to disk
up to the room the check left, then recorded. Reading it costs no more than the check would
have saved, and at most this much memory per request."""


@router.post(
    "",
    status_code=202,
    response_model=UploadAccepted,
    responses={200: {"model": UploadAccepted}, 413: {"model": ErrorBody},
               422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [FILE_FIELD], "properties": {
            FILE_FIELD: {"type": "string", "format": "binary"}}}}}}},
)
async def upload_document(
    request: Request,
    workspace: WriterWorkspaceDep,
    response: Response,
    force: Annotated[bool, Query(description="Ingest again even if identical bytes exist")] = False,
) -> UploadAccepted:
    """Upload one document (multipart field `file`). Its bytes are streamed to the blob store
    as they arrive, hashed on the way, and refused with `413 too_large` the moment they pass
    the limit (nothing is left behind); a job is recorded in the same transaction as the
    document and published after commit (or held, queued without a message, while the
    workspace has as many documents in flight as `SLUICE_WORKSPACE_INFLIGHT_CAP`: it goes out
    when one of them ends; `GET /v1/jobs/{id}` shows `held`).

    Identical bytes already in the workspace return the existing document with `200` and
    `"duplicate": true`, unless `force=true`."""
    settings = get_settings()
    announced = request.headers.get("content-length", "")
    upload = MultipartUpload(request, max_body_bytes=settings.max_upload_bytes + BODY_OVERHEAD)
    if announced.isdigit() and int(announced) <= SMALL_BODY_BYTES:
        content = await _read_small(upload, limit=settings.max_upload_bytes)
        blob = None
    else:
        content, blob = None, await _stream_to_store(request, upload, workspace)
    filename = clean_filename(upload.filename)
    staged = None
    if blob is None:
        assert content is not None
        sha256, size = hashlib.sha256(content).hexdigest(), len(content)
        # Written by a thread of its own while the recorder runs other uploads' transactions
        # (creating a file is kernel time: ~0.1-0.3 ms here, more than the upload's SQL).
        staged = await asyncio.get_running_loop().run_in_executor(
            _stager, blob_store().stage, content)
    else:
        sha256, size = blob.sha256, blob.size
    accepted = await _recorder.submit(_Upload(
        workspace=workspace, sha256=sha256, size=size, staged=staged, filename=filename,
        content_type=upload.content_type, force=force, request_id=current_request_id()))
    bind_context(job_id=accepted.job_id, document_id=accepted.document_id)  # the request's line
    if accepted.duplicate:
        log.info("upload of %r is a duplicate of document %s", filename, accepted.document_id)
        response.status_code = 200
    else:
        log.info("document %s (%r, %d bytes) uploaded as job %s", accepted.document_id,
                 filename, size, accepted.job_id)
    response.headers["Location"] = f"/v1/jobs/{accepted.job_id}"
    return accepted


async def _read_small(upload: MultipartUpload, *, limit: int) -> bytes:
    """A small body's file, whole: checked against the quotas, and stored once it fits, in
    the upload's transaction (`_record_uploads`)."""
    chunks, size = [], 0
    async for chunk in upload.file_chunks():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", str(BlobTooLarge(limit)))
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream_to_store(request: Request, upload: MultipartUpload, workspace: str
                           ) -> StoredBlob:
    """A large (or chunked) body's file, streamed to the blob store after the quotas were
    checked and up to the room they leave."""
    settings = get_settings()
    room = await run_in_threadpool(_room_for_upload, workspace)
    limit = settings.max_upload_bytes if room is None else min(settings.max_upload_bytes, room)
    announced = request.headers.get("content-length", "")
    if room is not None and announced.isdigit() and int(announced) > room + BODY_OVERHEAD:
        raise _storage_quota(room)
    try:
        return await blob_store().store_stream(workspace, upload.file_chunks(), max_bytes=limit)
    except BlobTooLarge as exc:
        if room is not None and room < settings.max_upload_bytes:
            raise _storage_quota(room) from exc
        raise ApiError(413, "too_large", str(exc)) from exc


@dataclass(frozen=True, slots=True)
class _Upload:
    """What `_record_uploads` needs of one upload."""

    workspace: str
    sha256: str
    size: int
    staged: Path | None
    """A small upload's bytes in a temporary file, put in place by its transaction once it is
    accepted (and removed by `_record_and_publish` if it never is); None: streamed to the
    store already."""
    filename: str
    content_type: str | None
    force: bool
    request_id: str | None


def _record_and_publish(uploads: Sequence[_Upload]) -> list[UploadAccepted | Exception]:
    """`_recorder`'s batch: the uploads recorded in one transaction, then, after its commit,
    each new job published, or left held."""
    try:
        results = _record_uploads(uploads)
    except BaseException:  # nothing recorded: no staged file is kept
        for upload in uploads:
            _discard_staged(upload)
        raise
    for upload, result in zip(uploads, results, strict=True):
        if isinstance(result, Exception) or result[0].duplicate:  # its staged file not kept
            _discard_staged(upload)
            continue
        accepted, room = result
        try:
            _publish_or_hold(upload, accepted.job_id, room)
        except Exception:  # recorded, so accepted all the same: the reconciler republishes
            # a queued job whose message never went out; the other uploads of the batch keep
            # their 202
            log.exception("job %s: publishing after its upload failed", accepted.job_id,
                          extra={"job_id": accepted.job_id, "request_id": upload.request_id})
    return [r if isinstance(r, Exception) else r[0] for r in results]


def _discard_staged(upload: _Upload) -> None:
    if upload.staged is not None:
        upload.staged.unlink(missing_ok=True)


def _publish_or_hold(upload: _Upload, job_id: str, room: fairness.Room | None) -> None:
    cap = get_settings().workspace_inflight_cap
    if room is None or room.admits(cap):  # marked published with its creation
        # (the job's request id is its upload's: no need to read it back)
        publish_job(job_id, Stage.PARSE, mark=False, request_id=upload.request_id)
        return
    log.info("job %s held: the workspace has %d documents in flight (cap %s)", job_id,
             room.in_flight, cap, extra={"job_id": job_id, "request_id": upload.request_id})
    if room.frees(cap):  # older jobs were held although there is room: a dispatch was missed
        dispatch_held(upload.workspace, JobKind.INGEST)


def _room_for_upload(workspace: str) -> int | None:
    """Bytes the workspace may still store (None: no storage quota). Refuses at once what
    cannot fit whatever the size (document count, unfinished jobs, storage full), so a
    refused upload is not even read."""
    settings = get_settings()
    with read_scope() as session:
        quota, used = quotas.measure(session, workspace_id=workspace,
                                     defaults=default_quota(settings))
        return _room_left(session, workspace=workspace, quota=quota, used=used)


def _room_left(session: Session, *, workspace: str, quota: quotas.Quota, used: quotas.Usage
               ) -> int | None:
    settings = get_settings()
    quotas.check_document(session, workspace_id=workspace, quota=quota, size_bytes=0,
                          retry_after_s=settings.quota_retry_after_s, used=used)
    return None if quota.stored_bytes is None else quota.stored_bytes - used.stored_bytes


def _storage_quota(room: int) -> ApiError:
    return ApiError(413, "storage_quota_exceeded",
                    f"the upload does not fit the workspace's storage quota ({room} bytes left)")


@dataclass(slots=True)
class _Workspace:
    """A workspace of a batch as its uploads left it."""

    quota: quotas.Quota
    used: quotas.Usage
    room: fairness.Room | None = None
    """Its ingest lane, read when its first job is created."""
    same_bytes: dict[str, tuple[str, str]] = field(default_factory=dict)
    """sha256 -> the (document, latest ingest job) holding those bytes, of the batch's
    uploads (read at once) and then of those it adds."""


_Recorded = tuple[UploadAccepted, fairness.Room | None]


def _record_uploads(uploads: Sequence[_Upload]) -> list[_Recorded | Exception]:
    """Each upload's document and job, if they still fit the quotas, all in one transaction
    (`_recorder`, a group commit): each workspace is locked (in name order) and measured
    once, then the uploads are checked in arrival order against what the earlier ones of the
    batch took, exactly as one transaction each would have been, so concurrent uploads still
    cannot both take the last place, nor the last in-flight slot. A refused upload leaves no
    row and gets its own error; a streamed one's blob, if no document uses it, goes with the
    orphan purge. A small upload's `content` is refused as `_room_for_upload` and the
    stream's limit would have refused it, and stored (before commit, so its job never lacks
    it) only once it fits and is not a duplicate. Each result carries the lane's room its job
    was admitted by (None for a duplicate): it was created held unless the room admitted
    it."""
    settings = get_settings()
    defaults = default_quota(settings)
    cap = settings.workspace_inflight_cap
    results: list[_Recorded | Exception] = []
    new_documents: list[documents.NewDocument] = []
    new_jobs: list[ledger.NewJob] = []
    with session_scope() as session:
        # Locked from here to commit: each statement below delays every other upload to
        # these workspaces.
        spaces = {ws: _Workspace(*_lock_and_measure(session, ws, defaults))
                  for ws in sorted({u.workspace for u in uploads})}
        for ws, space in spaces.items():
            space.same_bytes = _same_bytes(session, ws, {
                u.sha256 for u in uploads if u.workspace == ws and not u.force})
        for upload in uploads:
            space = spaces[upload.workspace]
            try:
                existing = _check_upload(session, upload, space)
            except (quotas.QuotaExceeded, ApiError) as exc:
                results.append(exc)
                continue
            if existing is not None:
                results.append((UploadAccepted(document_id=existing[0], job_id=existing[1],
                                               duplicate=True), None))
                continue
            if upload.staged is not None:
                blob_store().place(upload.staged, upload.workspace, upload.sha256)
            if space.room is None:
                space.room = fairness.room(session, workspace_id=upload.workspace,
                                           lane=fairness.INGEST)
            room, admitted = space.room, space.room.admits(cap)
            doc = documents.NewDocument(
                workspace_id=upload.workspace, filename=upload.filename,
                content_type=upload.content_type, sha256=upload.sha256,
                size_bytes=upload.size)
            job = ledger.NewJob(workspace_id=upload.workspace, kind=JobKind.INGEST,
                                stage=Stage.PARSE, request_id=upload.request_id,
                                document_id=doc.id, held=not admitted, published=admitted)
            new_documents.append(doc)
            new_jobs.append(job)
            space.same_bytes[upload.sha256] = (doc.id, job.id)
            used = space.used
            space.used = quotas.Usage(documents=used.documents + 1,
                                      stored_bytes=used.stored_bytes + upload.size,
                                      queued_jobs=used.queued_jobs + 1)
            space.room = fairness.Room(in_flight=room.in_flight + (1 if admitted else 0),
                                       held=room.held or not admitted)
            results.append((UploadAccepted(document_id=doc.id, job_id=job.id), room))
        documents.insert_documents(session, new_documents)
        ledger.insert_jobs(session, new_jobs)
    return results


def _lock_and_measure(session: Session, workspace: str, defaults: quotas.Quota
                      ) -> tuple[quotas.Quota, quotas.Usage]:
    """Lock the workspace; its quota and usage (the lock, then one statement)."""
    try:
        return quotas.measure(session, workspace_id=workspace, defaults=defaults, lock=True)
    except LookupError:  # its first upload
        ensure_workspace(session, workspace)
        return quotas.measure(session, workspace_id=workspace, defaults=defaults, lock=True)


def _check_upload(session: Session, upload: _Upload, space: _Workspace
                  ) -> tuple[str, str] | None:
    """Raise unless the upload fits its workspace's quotas; the (document, job) already
    holding its bytes, unless `force`. Same checks, same order as a streamed upload meets
    them (`_room_for_upload`, the stream's limit, then the transaction's)."""
    settings = get_settings()
    if upload.staged is not None:
        room_left = _room_left(session, workspace=upload.workspace, quota=space.quota,
                               used=space.used)
        if room_left is not None and upload.size > room_left:
            raise _storage_quota(room_left)
    if not upload.force and (existing := space.same_bytes.get(upload.sha256)) is not None:
        return existing
    quotas.check_document(session, workspace_id=upload.workspace, quota=space.quota,
                          size_bytes=upload.size, retry_after_s=settings.quota_retry_after_s,
                          used=space.used)
    return None


def _same_bytes(session: Session, workspace: str, hashes: set[str]
                ) -> dict[str, tuple[str, str]]:
    """The documents of the workspace already holding any of these bytes, each with its
    latest ingest job, in one statement."""
    if not hashes:
        return {}
    latest: dict[str, tuple[str, str, datetime]] = {}
    for sha256, document_id, job_id, created_at in session.execute(
            _SAME_BYTES, {"workspace_id": workspace, "hashes": sorted(hashes)}):
        if sha256 not in latest or created_at > latest[sha256][2]:
            latest[sha256] = (document_id, job_id, created_at)
    return {sha256: (doc, job) for sha256, (doc, job, _) in latest.items()}


_recorder = GroupCommit(_record_and_publish, name="upload-recorder")
_stager = ThreadPoolExecutor(2, thread_name_prefix="upload-stager")


# The documents already holding any of some bytes, with their ingest jobs. Built once, as the
# other statements of an upload (models.quotas), since it runs under the workspace's lock.
_SAME_BYTES = (
    select(Document.sha256, Document.id, Job.id, Job.created_at)
    .join(Job, Job.document_id == Document.id)
    .where(Document.workspace_id == bindparam("workspace_id"),
           Document.sha256.in_(bindparam("hashes", expanding=True)),
           Job.kind == JobKind.INGEST)
)


@router.get("", response_model=DocumentList)
def list_documents(
    session: SessionDep,
    workspace: WorkspaceDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    status: str | None = None,
) -> DocumentList:
    """The workspace's documents, newest first."""
    where = [Document.workspace_id == workspace]
    if status is not None:
        where.append(Document.status == status)
    total = session.scalar(select(func.count()).select_from(Document).where(*where)) or 0
    docs = session.scalars(
        select(Document).where(*where).order_by(Document.created_at.desc(), Document.id)
        .limit(limit).offset(offset)
    ).all()
    return DocumentList(documents=[_document_out(session, d) for d in docs], total=total,
                        limit=limit, offset=offset)


@router.get("/{document_id}", response_model=DocumentOut, responses={404: {"model": ErrorBody}})
def get_document(document_id: str, session: SessionDep, workspace: WorkspaceDep) -> DocumentOut:
    return _document_out(session, _owned_document(session, workspace, document_id))


@router.delete("/{document_id}", status_code=204, responses={404: {"model": ErrorBody}})
def delete_document(document_id: str, workspace: WriterWorkspaceDep) -> Response:
    """Delete a document with its chunks and vectors; an ingest still running is cancelled."""
    with session_scope() as session:
        doc = _owned_document(session, workspace, document_id)
        sha = doc.sha256
        for job_id in session.scalars(select(Job.id).where(Job.document_id == document_id)):
            ledger.cancel(session, job_id=job_id)
        session.delete(doc)
        session.flush()
        still_used = session.scalar(
            select(func.count()).select_from(Document)
            .where(Document.workspace_id == workspace, Document.sha256 == sha)
        )
    dispatch_held(workspace, JobKind.INGEST)  # a cancelled job's slot is free
    if not still_used:
        blob_store().delete(workspace, sha)
    return Response(status_code=204)


def _owned_document(session: SessionDep, workspace: str, document_id: str) -> Document:
    doc = session.get(Document, document_id)
    if doc is None or doc.workspace_id != workspace:
        raise not_found("document", document_id)
    return doc


def _document_out(session: SessionDep, doc: Document) -> DocumentOut:
    job_id = session.scalar(
        select(Job.id).where(Job.document_id == doc.id).order_by(Job.created_at.desc()).limit(1)
    )
    out = DocumentOut.model_validate(doc)
    out.job_id = job_id
    if doc.error_code:
        out.error = ErrorInfo(code=doc.error_code, message=doc.error_message or "")
    return out
