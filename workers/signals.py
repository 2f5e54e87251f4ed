"""Worker signal handlers: fresh database connections after fork, logging set up once."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_process_init

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
