"""Thin Celery tasks: load by id, call a pipeline, persist, hand off."""
