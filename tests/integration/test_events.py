"""The job event stream of a real ingest, across processes (worker → database → API)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATA
from tests.stack import StackFactory

pytestmark = pytest.mark.integration


def _read_sse(response: httpx.Response) -> list[dict]:
    # one `data:` line per event in our streams
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_stream_of_an_ingest_shows_every_stage_in_order(
    sluice_env: dict[str, str], stack: StackFactory, data_dir: Path
) -> None:
    s = stack(sluice_env)
    workspace_events: list[dict] = []

    def follow_workspace() -> None:
        with httpx.stream("GET", f"{s.url}/v1/events", timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    workspace_events.append(json.loads(line[6:]))
                    if workspace_events[-1]["state"] == "succeeded":
                        return

    follower = threading.Thread(target=follow_workspace, daemon=True)
    follower.start()
    upload = s.upload(DATA / "docs" / "unstructured" / "handbook-1p.docx").json()
    with httpx.stream("GET", f"{s.url}/v1/jobs/{upload['job_id']}/events", timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(resp)  # ends by itself when the job ends
    steps = [(e["state"], e["stage"]) for e in events]
    wanted = [("queued", "parse"), ("running", "parse"), ("running", "embed"),
              ("succeeded", "embed")]
    assert all(w in steps for w in wanted), steps
    positions = [steps.index(w) for w in wanted]
    assert positions == sorted(positions), steps
    assert steps[-1] == ("succeeded", "embed")
    assert all(e["job_id"] == upload["job_id"] for e in events)
    follower.join(timeout=60)
    assert ("succeeded", "embed") in [(e["state"], e["stage"]) for e in workspace_events]

    # Resuming after the last event replays nothing more of a finished job, and another
    # workspace cannot follow this job.
    with s.client("other") as other:
        assert other.get(f"/v1/jobs/{upload['job_id']}/events").status_code == 404
        assert other.get("/v1/events", params={"workspace": "default"}).status_code == 403
