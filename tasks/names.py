"""Task names and queues: plain string constants, the one place they are declared.

(Strings, not an Enum: Celery treats anything with a `.name` attribute as a task.)
"""

from __future__ import annotations

QUEUE_PARSE = "parse"
QUEUE_EMBED = "embed"
QUEUE_ANSWER = "answer"
QUEUE_MAINTENANCE = "maintenance"
QUEUES = (QUEUE_PARSE, QUEUE_EMBED, QUEUE_ANSWER, QUEUE_MAINTENANCE)

PARSE_DOCUMENT = "sluice.ingest.parse_document"
EMBED_DOCUMENT = "sluice.ingest.embed_document"
ANSWER_QUESTION = "sluice.answer.answer_question"
RECONCILE_JOBS = "sluice.maintenance.reconcile_jobs"
PURGE_EXPIRED = "sluice.maintenance.purge_expired"
REEMBED_OUTDATED = "sluice.maintenance.reembed_outdated_chunks"
DEAD_LETTER_DIGEST = "sluice.maintenance.dead_letter_digest"

QUEUE_OF_TASK = {
    PARSE_DOCUMENT: QUEUE_PARSE,
    EMBED_DOCUMENT: QUEUE_EMBED,
    ANSWER_QUESTION: QUEUE_ANSWER,
    RECONCILE_JOBS: QUEUE_MAINTENANCE,
    PURGE_EXPIRED: QUEUE_MAINTENANCE,
    REEMBED_OUTDATED: QUEUE_MAINTENANCE,
    DEAD_LETTER_DIGEST: QUEUE_MAINTENANCE,
}

# Beat entry → task; celeryconfig schedules each at its interval from the settings, and
# `sluice maintenance run ENTRY` runs one now.
PERIODIC_TASKS = {
    "reconcile-jobs": RECONCILE_JOBS,
    "purge-expired": PURGE_EXPIRED,
    "reembed-outdated-chunks": REEMBED_OUTDATED,
    "dead-letter-digest": DEAD_LETTER_DIGEST,
}

# The stage a job is at decides which task runs it next.
TASK_OF_STAGE = {
    "parse": PARSE_DOCUMENT,
    "embed": EMBED_DOCUMENT,
    "answer": ANSWER_QUESTION,
}
STAGE_OF_TASK = {task: stage for stage, task in TASK_OF_STAGE.items()}
