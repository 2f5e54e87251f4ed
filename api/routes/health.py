"""Probes: `/healthz` (the process is alive) and `/readyz` (it can do its work)."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sluice import status

router = APIRouter(tags=["health"])


@lru_cache(maxsize=1)
def worker_probe() -> status.CachedWorkerProbe:
    return status.CachedWorkerProbe()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the body says why."}})
async def readyz() -> JSONResponse:
    """Ready: the database is reachable and migrated to the newest revision, the broker is
    reachable, and at least one worker answers for each queue (parse, embed, answer,
    maintenance). `200` when ready, else `503`; the body names the workers serving each queue.
    The workers' answer is cached for a few seconds."""
    result = await run_in_threadpool(status.readiness, worker_probe())
    return JSONResponse(result.to_dict(), status_code=200 if result.ready else 503)
