"""Worker signal handlers: fresh database connections after fork, logging set up once."""

from __future__ import annotations

from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.signals import setup_logging, task_failure, worker_process_init

from sluice.db import dispose_engine
from sluice.logs import configure_logging


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Never share the parent's connections with a forked child. (Must return fast: models
    # load lazily on first use, not here.)
    dispose_engine(after_fork=True)


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
