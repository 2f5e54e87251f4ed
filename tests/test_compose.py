"""docker-compose.yml is validated against the code (no Docker engine runs here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice.processes import WORKER_ARGS
from sluice.settings import Settings
from tasks.names import QUEUES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_every_queue_has_one_worker_service_with_its_pool(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for queue in QUEUES:
        service = services[f"worker-{queue}"]
        command = service["command"]
        assert command[:4] == ["celery", "-A", "workers.app", "worker"]
        assert _flag(command, "--queues") == queue
        assert _flag(command, "--pool") == _flag(WORKER_ARGS[queue], "--pool")
        assert "healthcheck" in service


def test_backing_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pgvector" in services["postgres"]["image"]
    redis_cmd = services["redis"]["command"]
    assert _flag(redis_cmd, "--maxmemory-policy") == "noeviction"
    assert _flag(redis_cmd, "--appendonly") == "yes"
    assert services["beat"]["deploy"]["replicas"] == 1
    assert services["flower"]["command"][:2] == ["sluice", "flower"]  # refuses to run without auth
    assert "SLUICE_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["migrate"]["command"] == ["sluice", "migrate"]


def test_environment_names_are_real_settings(compose: dict[str, Any]) -> None:
    fields = {f"SLUICE_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in service.get("environment", {}) or {}:
            if key.startswith("SLUICE_"):
                assert key in fields, f"{name}: {key} is not a Sluice setting"


def test_sluice_services_share_the_blob_volume(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ("postgres", "redis"):
            continue
        assert "blobs:/data" in service["volumes"], name
        env = service["environment"]
        assert env["SLUICE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SLUICE_BROKER_URL"].startswith("redis://")
    assert {"pgdata", "redisdata", "blobs"} <= set(compose["volumes"])


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for package in ("api", "workers", "tasks", "pipelines", "models", "migrations", "sluice"):
        assert f"COPY {package} {package}" in dockerfile
    assert "celeryconfig.py" in dockerfile


def test_metrics_files_are_private_to_each_container(compose: dict[str, Any]) -> None:
    for queue in QUEUES:
        env = compose["services"][f"worker-{queue}"]["environment"]
        assert not env["PROMETHEUS_MULTIPROC_DIR"].startswith("/data")  # not the shared volume
        assert 0 < int(env["SLUICE_WORKER_METRICS_PORT"]) < 65536
    assert compose["services"]["api"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]


def test_production_settings_with_auth_and_no_secret_in_the_file(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in compose["services"].items():
        if name in ("postgres", "redis"):
            continue
        env = service["environment"]
        assert env["SLUICE_ENV"] == "production", name
        assert env["SLUICE_AUTH_ENABLED"] == "1", name
        for key in list(os.environ):
            if key.startswith("SLUICE_"):
                monkeypatch.delenv(key)
        for key, value in env.items():  # these settings start (production with auth on)
            if key.startswith("SLUICE_") and "${" not in str(value):
                monkeypatch.setenv(key, str(value))
        Settings()
    token = compose["services"]["api"]["environment"]["SLUICE_ADMIN_TOKEN"]
    assert token.startswith("${SLUICE_ADMIN_TOKEN")  # taken from the environment
