"""Retention: delete what has outlived its use, in short transactions.

- succeeded and cancelled jobs `job_retention_days` after they finished (the ingest job of a
  document that still exists is kept: it is the document's status);
- dead and failed jobs (the dead-letter store: replayable) `dead_letter_retention_days` after;
- stored Idempotency-Key responses after `idempotency_key_retention_hours`;
- blobs no document references, once their file is `orphan_blob_grace_hours` old.

Queued, running and retrying jobs are never deleted. Everything is idempotent: a second run
finds nothing more to delete.

Orphaned blobs and uploads in flight: an upload writes its blob before the transaction that
records its document commits, so a blob without a document may be one that is about to get
one. Only a file older than the grace period is considered (every upload, even of bytes
already stored, writes the file again, so its age is the age of the latest upload), and it is
first renamed aside atomically, then the database is asked again: if a document references it
now, or the renamed file turns out to be fresh (an upload replaced it meanwhile), it is put
back. A blob is lost only to an upload whose request stalled for longer than the grace period
between writing the blob and committing its document.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from models import JobState, retention
from models.entities import utcnow
from sluice.blobs import BlobStore
from sluice.db import read_scope, session_scope
from sluice.settings import Settings

log = logging.getLogger(__name__)

Keep = Callable[[], None]
INCOMING = ".incoming"  # BlobStore's temporary upload files
PURGING = ".purging-"  # a blob renamed aside, about to be deleted
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PREFIX_RE = re.compile(r"^[0-9a-f]{2}$")
_GONE = float("inf")


def enabled(value: float | None) -> bool:
    """A retention or grace of 0 or `none` means keep for ever."""
    return value is not None and value > 0


def purge_expired(
    *, settings: Settings, blobs: BlobStore, keep: Keep = lambda: None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One retention run; returns how many of each kind were deleted. `keep` is called
    between batches (it renews the run's lease, raising when it was lost)."""
    now = now or utcnow()
    batch = settings.purge_batch_size
    result: dict[str, Any] = {"jobs": 0, "dead_jobs": 0, "idempotency_keys": 0, "blobs": 0,
                              "incoming": 0}
    if enabled(settings.job_retention_days):
        before = now - timedelta(days=settings.job_retention_days or 0)
        result["jobs"] = _in_batches(keep, batch, lambda s: retention.purge_jobs(
            s, states=(JobState.SUCCEEDED, JobState.CANCELLED), finished_before=before,
            keep_live_ingest=True, limit=batch))
    if enabled(settings.dead_letter_retention_days):
        before = now - timedelta(days=settings.dead_letter_retention_days or 0)
        result["dead_jobs"] = _in_batches(keep, batch, lambda s: retention.purge_jobs(
            s, states=(JobState.DEAD, JobState.FAILED), finished_before=before,
            keep_live_ingest=False, limit=batch))
    if enabled(settings.idempotency_key_retention_hours):
        before = now - timedelta(hours=settings.idempotency_key_retention_hours or 0)
        result["idempotency_keys"] = _in_batches(keep, batch, lambda s: (
            retention.purge_idempotency_keys(s, created_before=before, limit=batch)))
    if enabled(settings.orphan_blob_grace_hours):
        cutoff = now - timedelta(hours=settings.orphan_blob_grace_hours or 0)
        result["blobs"], result["incoming"] = purge_orphan_blobs(
            blobs, older_than=cutoff, batch=batch, keep=keep)
    if any(result.values()):
        log.info("retention: deleted %(jobs)d finished jobs, %(dead_jobs)d dead or failed jobs, "
                 "%(idempotency_keys)d idempotency keys, %(blobs)d orphaned blobs, "
                 "%(incoming)d abandoned uploads", result)
    return result


def _in_batches(keep: Keep, batch: int, step: Callable[[Any], int]) -> int:
    total = 0
    while True:
        with session_scope() as session:
            done = step(session)
        total += done
        if done < batch:
            return total
        keep()


def purge_orphan_blobs(
    blobs: BlobStore, *, older_than: datetime, batch: int, keep: Keep = lambda: None
) -> tuple[int, int]:
    """Delete blobs no document references whose file is older than `older_than`, and
    abandoned temporary upload files as old; returns (blobs, temporary files) deleted."""
    root = blobs.root
    if not root.is_dir():
        return 0, 0
    cutoff = older_than.timestamp()
    incoming = _purge_incoming(root / INCOMING, cutoff)
    candidates: dict[str, list[str]] = defaultdict(list)
    leftovers: list[tuple[str, Path]] = []
    for workspace, path in _blob_files(root):
        if PURGING in path.name:
            leftovers.append((workspace, path))
        elif _mtime(path) < cutoff:
            candidates[workspace].append(path.name)
    deleted = _settle_leftovers(blobs, leftovers, cutoff)
    for workspace, shas in candidates.items():
        for start in range(0, len(shas), batch):
            deleted += _purge_batch(blobs, workspace, shas[start : start + batch], cutoff)
            keep()
    return deleted, incoming


def _purge_batch(blobs: BlobStore, workspace: str, shas: list[str], cutoff: float) -> int:
    with read_scope() as session:
        used = retention.referenced_blobs(session, workspace_id=workspace, sha256s=shas)
    aside: dict[str, Path] = {}
    for sha in shas:
        if sha in used:
            continue
        path = blobs.path_for(workspace, sha)
        moved = path.with_name(f"{sha}{PURGING}{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, moved)  # atomic: from here no upload can reuse this file
        except FileNotFoundError:
            continue
        aside[sha] = moved
    return _decide(blobs, workspace, aside, cutoff)


def _decide(blobs: BlobStore, workspace: str, aside: dict[str, Path], cutoff: float) -> int:
    """Delete the blobs renamed aside that no document references, now that they can no
    longer be reused; put back the others."""
    if not aside:
        return 0
    with read_scope() as session:
        used = retention.referenced_blobs(session, workspace_id=workspace, sha256s=list(aside))
    deleted = 0
    for sha, moved in aside.items():
        mtime = _mtime(moved)
        if mtime == _GONE:
            continue
        if sha in used or mtime >= cutoff:
            # Referenced after all, or an upload replaced the file between the first look and
            # the rename: put it back (content-addressed, so it is the same bytes as any file
            # an upload may have written there since).
            os.replace(moved, blobs.path_for(workspace, sha))
            continue
        moved.unlink(missing_ok=True)
        deleted += 1
    return deleted


def _settle_leftovers(blobs: BlobStore, leftovers: list[tuple[str, Path]], cutoff: float) -> int:
    """Blobs renamed aside by a run that stopped before deciding: decide now."""
    by_workspace: dict[str, dict[str, Path]] = defaultdict(dict)
    for workspace, path in leftovers:
        by_workspace[workspace][path.name.split(PURGING, 1)[0]] = path
    return sum(_decide(blobs, workspace, aside, cutoff)
               for workspace, aside in by_workspace.items())


def _blob_files(root: Path) -> list[tuple[str, Path]]:
    """(workspace, file) of every blob under `root`, laid out as `BlobStore.path_for` does
    (`<workspace>/<sha256[:2]>/<sha256>`), plus blobs renamed aside for purging. Anything
    else is not ours and never touched."""
    found: list[tuple[str, Path]] = []
    for workspace_dir in _dirs(root):
        workspace = workspace_dir.name
        if workspace == INCOMING or not _WORKSPACE_RE.match(workspace):
            continue
        for prefix_dir in _dirs(workspace_dir):
            if not _PREFIX_RE.match(prefix_dir.name):
                continue
            for path in _files(prefix_dir):
                sha = path.name.split(PURGING, 1)[0]
                if _SHA_RE.match(sha) and sha.startswith(prefix_dir.name):
                    found.append((workspace, path))
    return found


def _purge_incoming(incoming: Path, cutoff: float) -> int:
    deleted = 0
    for path in _files(incoming):
        if _mtime(path) < cutoff:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def _dirs(parent: Path) -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def _files(parent: Path) -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.is_file() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return _GONE  # gone meanwhile: never deletable
