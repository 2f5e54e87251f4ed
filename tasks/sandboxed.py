"""The parse stage's glue shared by whole documents (tasks.ingest) and page ranges
(tasks.parts): the parser's options and limits from the settings, and running it in the
sandbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.guards import GuardLimits
from pipelines.hygiene import HygieneLimits
from sluice.settings import get_settings
from tasks.runner import StageContext
from workers import resources

if TYPE_CHECKING:
    from pipelines.sandbox import Resident

T = TypeVar("T")


def guard_limits() -> GuardLimits:
    settings = get_settings()
    return GuardLimits(
        max_file_bytes=settings.max_upload_bytes,
        max_archive_bytes=settings.max_archive_uncompressed_mb << 20,
        max_archive_entries=settings.max_archive_entries,
        max_compression_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
        max_pdf_pages=settings.max_pdf_pages,
    )


def hygiene_limits() -> HygieneLimits:
    settings = get_settings()
    return HygieneLimits(max_bad_ratio=settings.garbage_max_bad_ratio,
                         min_alnum_ratio=settings.garbage_min_alnum_ratio)


def parse_options(*, filename: str, content_type: str | None) -> dict[str, Any]:
    """`parse_document`'s keyword arguments but the path."""
    settings = get_settings()
    return {
        "filename": filename, "content_type": content_type,
        "pdf_strategy": settings.pdf_strategy, "languages": settings.parse_languages,
        "tagger_path": resources.tagger_path(), "guard_limits": guard_limits(),
        "hygiene_limits": hygiene_limits(),
    }


_resident: Resident | None = None
"""This pool process's resident parse child (pipelines.sandbox.Resident), made on first use."""


def run_parser(ctx: StageContext, fn: Callable[..., T], kwargs: dict[str, Any], *,
               label: str) -> T:
    """`fn(**kwargs)` in a sandboxed child with the parse limits (or in-process when the sandbox
    is off): the pool process's resident child, or one forked for the call when
    `parse_sandbox_reuse` is 0. Imports and the tagger load first, once per pool process, so
    every child inherits them; `ctx.checkpoint` runs while the child works, so a cancelled job
    kills its parse."""
    global _resident
    from pipelines.parsing import warm_up
    from pipelines.sandbox import Resident, SandboxLimits, run_limited

    settings = get_settings()
    if not settings.parse_sandbox:
        return fn(**kwargs)
    warm_up(resources.tagger_path())
    memory_mb = settings.parse_memory_limit_mb
    limits = SandboxLimits(memory_bytes=None if memory_mb is None else memory_mb << 20,
                           cpu_time_s=settings.parse_cpu_time_s,
                           wall_time_s=settings.parse_wall_time_s)
    if settings.parse_sandbox_reuse == 0:
        result: T = run_limited(fn, kwargs=kwargs, limits=limits, poll=ctx.checkpoint,
                                label=label)
        return result
    if _resident is None or _resident.max_calls != settings.parse_sandbox_reuse:
        if _resident is not None:
            _resident.close()
        _resident = Resident(max_calls=settings.parse_sandbox_reuse)
    reused: T = _resident.call(fn, kwargs=kwargs, limits=limits, poll=ctx.checkpoint,
                               label=label)
    return reused
