"""The Celery app, worker signals and per-process resources."""
