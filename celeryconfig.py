"""Every Celery setting, built from `sluice.settings`: broker, queues, routes, limits, beat.

Choices that follow from Celery's known pitfalls:
- acks late + prefetch 1: a message is acknowledged only when its task has finished, and a
  worker holds at most one unstarted long job per process;
- reject on worker lost: a task whose process died is redelivered; the attempt counter in the
  job ledger bounds how often (a job that keeps killing workers ends `dead`, not looping);
- visibility timeout well above the longest hard time limit, so Redis never redelivers a task
  that is still running;
- no result backend: the database's job ledger is the source of truth;
- task events on (for Flower); beat tasks expire so a backlog never runs stale housekeeping.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from sluice.settings import Settings, get_settings
from tasks import names


def build(_settings: Settings) -> dict[str, Any]:
    """Every setting as a mapping, from `_settings`."""
    broker_url = _settings.resolved_broker_url
    broker_connection_retry_on_startup = True
    broker_transport_options: dict[str, Any]
    if broker_url.startswith("filesystem"):
        _folder = _settings.broker_folder
        for _sub in ("queue", "control"):
            (_folder / _sub).mkdir(parents=True, exist_ok=True)
        broker_transport_options = {
            "data_folder_in": str(_folder / "queue"),
            "data_folder_out": str(_folder / "queue"),
            "control_folder": str(_folder / "control"),
            "store_processed": False,
            "polling_interval": _settings.broker_polling_interval_s,
        }
    else:
        broker_transport_options = {
            "visibility_timeout": _settings.visibility_timeout_s,
            "polling_interval": _settings.broker_polling_interval_s,
        }
        if _settings.broker_key_prefix:
            broker_transport_options["global_keyprefix"] = _settings.broker_key_prefix

    result_backend = None
    task_ignore_result = True
    task_store_errors_even_if_ignored = False

    task_serializer = "json"
    accept_content = ["json"]
    timezone = "UTC"
    enable_utc = True

    task_default_queue = names.QUEUE_MAINTENANCE
    task_queues = [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in names.QUEUES]
    task_routes = {
        name: {"queue": queue, "routing_key": queue} for name, queue in names.QUEUE_OF_TASK.items()
    }
    task_create_missing_queues = False

    task_acks_late = True
    task_acks_on_failure = True
    task_acks_on_timeout = True
    task_reject_on_worker_lost = True
    worker_prefetch_multiplier = 1
    worker_cancel_long_running_tasks_on_connection_loss = True
    worker_max_tasks_per_child = 200
    worker_hijack_root_logger = False
    # Redeploys: SIGTERM (remapped to a cold shutdown, see sluice.processes) gives running
    # tasks `worker_soft_shutdown_timeout` seconds, then stops them and requeues their messages.
    worker_soft_shutdown_timeout = _settings.worker_soft_shutdown_s
    worker_enable_soft_shutdown_on_idle = True
    worker_send_task_events = True
    task_send_sent_event = True
    worker_enable_remote_control = True

    task_annotations = {
        names.PARSE_DOCUMENT: {
            "soft_time_limit": _settings.parse_soft_time_limit_s,
            "time_limit": _settings.parse_time_limit_s,
        },
        names.EMBED_DOCUMENT: {
            "soft_time_limit": _settings.embed_soft_time_limit_s,
            "time_limit": _settings.embed_time_limit_s,
        },
        names.ANSWER_QUESTION: {
            "soft_time_limit": _settings.answer_soft_time_limit_s,
            "time_limit": _settings.answer_time_limit_s,
        },
        names.RECONCILE_JOBS: {"soft_time_limit": 60, "time_limit": 90},
        names.PURGE_EXPIRED: {"soft_time_limit": 300, "time_limit": 330},
        names.REEMBED_OUTDATED: {"soft_time_limit": 600, "time_limit": 630},
        names.DEAD_LETTER_DIGEST: {"soft_time_limit": 60, "time_limit": 90},
    }

    # The beat schedule, all of it. Each entry expires after one interval, so a backlog never
    # runs stale housekeeping; each task also holds a lease while it runs (tasks.periodic),
    # so an accidental second beat does no harm. An interval of `none` leaves a task out.
    _every = {
        names.RECONCILE_JOBS: _settings.reconcile_interval_s,
        names.PURGE_EXPIRED: _settings.retention_interval_s,
        names.REEMBED_OUTDATED: _settings.reembed_interval_s,
        names.DEAD_LETTER_DIGEST: _settings.dead_letter_digest_interval_s,
    }
    beat_schedule = {
        _entry: {"task": _task, "schedule": _every[_task], "options": {"expires": _every[_task]}}
        for _entry, _task in names.PERIODIC_TASKS.items()
        if _every[_task] is not None
    }
    return {k: v for k, v in locals().items() if not k.startswith("_")}


globals().update(build(get_settings()))
