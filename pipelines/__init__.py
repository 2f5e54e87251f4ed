"""Pure document pipelines: plain values in, dataclasses out.

Nothing here imports Celery, SQLAlchemy, FastAPI or reads settings; heavy libraries
(unstructured, torch) are imported inside the functions that need them.
"""
