"""Schemathesis over the OpenAPI spec, with valid credentials (an admin key for /v1, the admin
token for /v1/admin): no request it generates gets a 5xx, and every response has a documented
status, content type, headers and body schema. The app is the real one with auth on (SQLite,
the filesystem broker, no worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from models.keys import Role
from tests.api.test_auth import ADMIN_TOKEN, configure, new_key

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture
def api(sluice_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    from api.app import create_app

    configure(monkeypatch, auth_enabled="1", admin_token=ADMIN_TOKEN, rate_limit_per_key="none")
    app = create_app()
    with TestClient(app):  # runs the app's startup
        key = new_key("conformance", Role.ADMIN)
        # something to find: a document and an answer job
        client = TestClient(app)
        headers = {"Authorization": f"Bearer {key}"}
        client.post("/v1/documents", headers=headers, files={"file": ("a.txt", b"a document")})
        client.post("/v1/answers", headers=headers, json={"question": "what?"})
        yield {"app": app, "key": key}


def _schema() -> Any:
    """The app's spec, loaded once at collection (the spec does not depend on settings; the
    requests go to the app of the `api` fixture). /v1/events is left out: it streams until
    the client goes away, and a test client waits for the end of a response."""
    from api.app import create_app

    return schemathesis.openapi.from_dict(create_app().openapi()).exclude(path="/v1/events")


# (not `schemathesis.pytest.from_fixture`: its lazy loader sets `Function._nodeid`, which
# pytest 9 no longer has)
schema = _schema()


@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_none_is_a_server_error(
    case: Any, api: dict[str, Any]
) -> None:
    token = ADMIN_TOKEN if case.path.startswith("/v1/admin/") else api["key"]
    if case.query and "wait" in case.query:
        case.query["wait"] = 0  # no worker answers; a long poll would only wait
    checks = CHECKS
    if case.path == "/readyz":  # 503 is its documented answer while no worker runs (here)
        checks = [c for c in CHECKS if c is not not_a_server_error]
    response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"},
                                      checks=checks, app=api["app"])
    if case.path == "/readyz":
        assert response.status_code < 500 or response.status_code == 503
