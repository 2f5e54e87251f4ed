"""Worker signal handlers: the parser loaded once in a parse worker's main process, fresh
database connections after fork, the embedding model warmed in the background, logging set up
once, metrics files of exited children retired and a worker's own
metrics port."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    setup_logging,
    task_failure,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from sluice import metrics
from sluice.db import dispose_engine
from sluice.logs import bind_context, clear_context, configure_logging
from sluice.settings import get_settings

log = logging.getLogger(__name__)

# Queues whose tasks encode with the embedding model.
_EMBEDDING_QUEUES = frozenset({"embed", "answer"})


@worker_init.connect
def _warm_parser(sender: Any = None, **_: Any) -> None:
    """A parse worker's main process imports unstructured and loads what it loads lazily
    (`pipelines.parsing.warm_up`: 4 CPU-s idle, 10 on a busy machine) before its pool forks,
    so every pool child, the ones that replace recycled children included, inherits it. Done
    in each child instead, every recycle (`--max-tasks-per-child`) paid it again: with 50
    tasks per child, about 0.1 s of CPU per small document. Nothing in it starts a Python
    thread (the unstructured telemetry thread is off: DO_NOT_TRACK, `sluice.processes`)."""
    if sender is None or "parse" not in _consumed(sender.app):
        return
    from pipelines.parsing import warm_up
    from workers import resources

    warm_up(resources.tagger_path())


def _consumed(app: Any) -> set[str]:
    return {queue.name for queue in app.amqp.queues.consume_from.values()}


@worker_process_init.connect
def _after_fork(sender: Any = None, **_: Any) -> None:
    # Never share the parent's connections with a forked child. (Must return fast, or the
    # pool takes the child for hung: anything slow to load starts here in a thread.)
    dispose_engine(after_fork=True)
    from workers.app import app

    consumed = _consumed(app)
    if consumed & _EMBEDDING_QUEUES and "parse" not in consumed:
        threading.Thread(target=_warm_embedder, name="warm-embedder", daemon=True).start()


def _warm_embedder() -> None:
    """Load the embedding model (exporting its onnx graph the first time: 1.5 s idle, 30 s on
    a busy machine) before the first document needs it; that task waits on the same lock. No
    parse pool runs this: a thread alive while the parse sandbox forks could leave a lock
    held in the child."""
    from workers import resources

    try:
        resources.embedder().encode(["warm-up"])
    except Exception:  # noqa: BLE001 - the first task loads it again and fails with the cause
        log.exception("warming the embedding model failed")


@worker_process_shutdown.connect
def _child_exits(**_: Any) -> None:
    metrics.mark_process_dead(os.getpid())


@worker_ready.connect
def _metrics_port(**_: Any) -> None:
    # In the main process, after the pool's first children were forked.
    port = get_settings().worker_metrics_port
    if port is not None:
        metrics.start_exporter(port)


@setup_logging.connect
def _logging(**_: Any) -> None:
    configure_logging()


@task_failure.connect
def _killed_attempt(sender: Any = None, exception: BaseException | None = None,
                    args: Any = None, **_: Any) -> None:
    """A child killed by its hard time limit never reaches the stage runner: the worker's
    main process records the attempt as failed with `timeout` (retried, then dead)."""
    from tasks.names import STAGE_OF_TASK
    from tasks.runner import fail_running_attempt

    stage = STAGE_OF_TASK.get(getattr(sender, "name", ""))
    if stage is None or not args or not isinstance(exception, TimeLimitExceeded | WorkerLostError):
        return
    code = "timeout" if isinstance(exception, TimeLimitExceeded) else "worker_lost"
    fail_running_attempt(str(args[0]), stage=stage, code=code,
                         message=f"{stage} was killed: {exception!r}")


@task_prerun.connect
def _bind_log_context(task: Any = None, args: Any = None, **_: Any) -> None:
    """Every line a task logs carries its job, stage and the request id its message carried
    (the `request_id` header, see tasks.publish); the stage runner adds the document."""
    from tasks.names import STAGE_OF_TASK

    stage = STAGE_OF_TASK.get(getattr(task, "name", ""))
    clear_context()
    bind_context(request_id=getattr(getattr(task, "request", None), "request_id", None),
                 job_id=str(args[0]) if stage and args else None, stage=stage)


@task_postrun.connect
def _clear_log_context(**_: Any) -> None:
    clear_context()  # a thread or process runs many tasks: never log with a finished one's ids
