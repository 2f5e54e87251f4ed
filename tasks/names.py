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

QUEUE_OF_TASK = {
    PARSE_DOCUMENT: QUEUE_PARSE,
    EMBED_DOCUMENT: QUEUE_EMBED,
    ANSWER_QUESTION: QUEUE_ANSWER,
    RECONCILE_JOBS: QUEUE_MAINTENANCE,
}

# The stage a job is at decides which task runs it next.
TASK_OF_STAGE = {
    "parse": PARSE_DOCUMENT,
    "embed": EMBED_DOCUMENT,
    "answer": ANSWER_QUESTION,
}
STAGE_OF_TASK = {task: stage for stage, task in TASK_OF_STAGE.items()}
