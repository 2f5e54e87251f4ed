"""Fault injection at a small size (bench/faults.py runs the same scenarios with 500+
documents): real worker processes, a real broker and database, and the fault itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import scenarios
from tests.stack import StackFactory

pytestmark = pytest.mark.integration

DOCS = 6


def _run(scenario, production_env, stack, tmp_path, monkeypatch, docs=DOCS):  # type: ignore[no-untyped-def]
    outcome = scenario(stack, production_env, docs=docs, tmp=tmp_path, monkeypatch=monkeypatch)
    print(outcome)
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
    return outcome


def test_sigkill_workers_repeatedly(production_env: dict[str, str], stack: StackFactory,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _run(scenarios.sigkill_workers, production_env, stack, tmp_path, monkeypatch,
                   docs=10)
    assert outcome.other["kills"] >= 3
    assert outcome.succeeded + outcome.dead == outcome.submitted
    assert outcome.succeeded >= outcome.submitted - 1


def test_redis_restarted_with_data_wiped(production_env: dict[str, str], stack: StackFactory,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _run(scenarios.redis_wiped, production_env, stack, tmp_path, monkeypatch)
    assert outcome.succeeded == outcome.submitted


def test_postgres_restarted(production_env: dict[str, str], stack: StackFactory,
                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _run(scenarios.postgres_restarted, production_env, stack, tmp_path, monkeypatch)
    assert outcome.succeeded == outcome.submitted


def test_always_transient_is_dead_after_max_retries_then_replays(
    production_env: dict[str, str], stack: StackFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = _run(scenarios.always_transient, production_env, stack, tmp_path, monkeypatch,
                   docs=3)
    assert outcome.dead == outcome.submitted  # every job dead before the fix ...
    assert outcome.other["embed_attempts_per_job"] == 3  # first try + max_retries (2)
    assert outcome.other["attempts_without_traceback"] == 0
    assert outcome.other["replayed"] == outcome.submitted
    assert outcome.other["succeeded_after_replay"] == outcome.submitted  # ... all fine after


def test_hard_time_limit_is_retried_then_dead_with_timeout(
    production_env: dict[str, str], stack: StackFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = _run(scenarios.hard_time_limit, production_env, stack, tmp_path, monkeypatch,
                   docs=2)
    assert outcome.dead == outcome.expected_dead == 1
    assert outcome.other["slow_dead_with_timeout"] == 1
    assert outcome.other["slow_attempts"] == 2  # first try + max_retries (1)
    assert outcome.other["normal_succeeded"] == 2
    assert outcome.succeeded == 2


def test_sigterm_mid_task_requeues_to_the_other_worker(
    production_env: dict[str, str], stack: StackFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = _run(scenarios.sigterm_mid_task, production_env, stack, tmp_path, monkeypatch)
    assert outcome.succeeded == outcome.submitted
    assert outcome.other["victim_exited"] == 1
    assert outcome.other["interrupted_attempts"] >= 1
    assert outcome.other["interrupted_then_succeeded"] >= 1


def test_duplicate_delivery_has_one_result(
    production_env: dict[str, str], stack: StackFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome = _run(scenarios.duplicate_delivery, production_env, stack, tmp_path, monkeypatch)
    assert outcome.succeeded == outcome.submitted
    # one parse and one embed attempt per job: the duplicates never ran
    assert outcome.other["attempts"] == 2 * outcome.submitted
