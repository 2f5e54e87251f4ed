"""The Celery application. Workers import the task modules; the API only sends by name."""

from __future__ import annotations

from celery import Celery

import celeryconfig
from sluice.settings import get_settings
from workers import fsbroker, redisbroker

fsbroker.install()  # `filesystem://` (the embedded broker) writes each message atomically
redisbroker.install()  # a worker whose Redis connection breaks reconnects instead of dying
app = Celery("sluice", include=["tasks.ingest", "tasks.answer", "tasks.maintenance"])
app.config_from_object("celeryconfig")


def reconfigure() -> None:
    """Rebuild the configuration from the current settings (tests switch between setups
    inside one process)."""
    app.conf.update(celeryconfig.build(get_settings()))
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None


import workers.signals  # noqa: E402,F401  (connects the worker signal handlers)
