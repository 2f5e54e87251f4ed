"""Flower watches the real stack: workers and ingest tasks (ids only in their arguments) show up
in its authenticated API. Also unit tests of its command line and credential rule."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from celery.utils.nodenames import host_format

from sluice.flower import check_auth, flower_command
from tasks import names
from tests.conftest import DATA, REPO, need
from tests.stack import Stack, StackFactory, free_port

pytestmark = pytest.mark.integration

DOC = DATA / "docs" / "unstructured" / "fake-text.txt"


# Unit tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("basic_auth", [None, ""])
def test_auth_is_optional_when_embedded(basic_auth: str | None) -> None:
    check_auth(basic_auth, embedded=True)


@pytest.mark.parametrize("basic_auth", [None, ""])
def test_auth_is_required_outside_embedded(basic_auth: str | None) -> None:
    with pytest.raises(ValueError, match="needs basic auth"):
        check_auth(basic_auth, embedded=False)


@pytest.mark.parametrize(("basic_auth", "message"), [
    ("admin", "user:password"),
    (":longenough", "user:password"),
    ("admin:", "at least 8"),
    ("admin:short", "at least 8"),
    ("admin:long,enough", "comma"),
])
@pytest.mark.parametrize("embedded", [True, False])
def test_weak_or_malformed_auth_is_refused(basic_auth: str, message: str, embedded: bool) -> None:
    with pytest.raises(ValueError, match=message):
        check_auth(basic_auth, embedded=embedded)


@pytest.mark.parametrize("embedded", [True, False])
def test_good_auth_is_accepted(embedded: bool) -> None:
    check_auth("admin:pass:word", embedded=embedded)


def test_flower_command() -> None:
    assert flower_command(port=5555, basic_auth=None) == [
        sys.executable, "-m", "celery", "-A", "workers.app", "flower",
        "--port=5555", "--address=127.0.0.1"]
    argv = flower_command(port=6000, address="0.0.0.0", basic_auth="admin:secret123",
                          url_prefix="/flower/")
    assert argv[6:] == ["--port=6000", "--address=0.0.0.0", "--basic-auth=admin:secret123",
                        "--url-prefix=flower"]


# Integration ----------------------------------------------------------------------------------
class Flower:
    def __init__(self, stack: Stack, basic_auth: str) -> None:
        self.port = free_port()
        user, _, password = basic_auth.partition(":")
        self.auth = (user, password)
        self.log_path = stack.log_dir / "flower.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                flower_command(port=self.port, basic_auth=basic_auth), env=stack.env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, *, auth: tuple[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=auth, timeout=30)

    def api(self, path: str) -> Any:
        resp = self.get(path, auth=self.auth)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"flower exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/healthcheck").text == "OK":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"flower not healthy after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


FlowerFactory = Callable[[Stack, str], Flower]


@pytest.fixture
def flower_for() -> Iterator[FlowerFactory]:
    """Factory: `flower_for(stack, "user:password")` starts Flower with the stack's
    environment; every Flower started is stopped at teardown."""
    started: list[Flower] = []

    def factory(stack: Stack, basic_auth: str) -> Flower:
        flower = Flower(stack, basic_auth)
        started.append(flower)
        return flower

    try:
        yield factory
    finally:
        for flower in started:
            flower.stop()


def _poll(check: Callable[[], Any], *, timeout: float, what: str,
          context: Callable[[], str]) -> Any:
    """Call `check` until it returns something truthy; fail with `context()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen after {timeout}s\n{context()}")


def test_flower_sees_worker_and_ingest_tasks(
    production_env: dict[str, str], stack: StackFactory, flower_for: FlowerFactory
) -> None:
    need(DOC.is_file(), f"{DOC} not found")
    s = stack(production_env)
    password = secrets.token_hex(8)
    flower = flower_for(s, "admin:" + password)
    flower.wait_healthy()
    worker = host_format("worker0@%h")

    def context() -> str:
        return f"{s.logs()}\n==== flower\n{flower.log()[-6000:]}"

    for path in ("/api/workers", "/api/tasks"):
        assert flower.get(path).status_code == 401
        assert flower.get(path, auth=("admin", password + "x")).status_code == 401

    # Flower sees only tasks that run after its event receiver connected: a worker heartbeat
    # event proves it has, before anything is uploaded.
    _poll(lambda: flower.api("/api/workers?status=1").get(worker), timeout=60,
          what=f"{worker} alive in Flower's events", context=context)

    upload = s.upload(DOC).json()
    job_id = upload["job_id"]
    job = s.wait_jobs([job_id], timeout=300)[job_id]
    assert job["state"] == "succeeded", (job, context())

    workers = _poll(lambda: flower.api("/api/workers?refresh=1").get(worker), timeout=60,
                    what=f"{worker} in /api/workers", context=context)
    assert names.QUEUE_PARSE in {q["name"] for q in workers["active_queues"]}

    def ingest_tasks() -> dict[str, dict[str, Any]] | None:
        tasks = flower.api("/api/tasks").values()
        found = {t["name"]: t for t in tasks if job_id in str(t.get("args"))}
        wanted = (names.PARSE_DOCUMENT, names.EMBED_DOCUMENT)
        if all(found.get(n, {}).get("state") == "SUCCESS" for n in wanted):
            return found
        return None

    found = _poll(ingest_tasks, timeout=60, what="parse and embed tasks in SUCCESS",
                  context=context)
    text = DOC.read_text()
    for name in (names.PARSE_DOCUMENT, names.EMBED_DOCUMENT):
        task = found[name]
        assert task["worker"] == worker, task
        assert task["args"] == repr([job_id]), task
        assert task["kwargs"] in ("{}", None), task
        for line in filter(None, (ln.strip(" -") for ln in text.splitlines())):
            assert line not in f"{task['args']}{task['kwargs']}", (line, task)
