"""The answer stage: retrieve the best passages of one workspace, compose a cited answer."""

from __future__ import annotations

from dataclasses import asdict

from celery import Task

from models import Stage
from sluice.db import session_scope
from sluice.retrieve import hybrid_search
from sluice.settings import get_settings
from tasks import names
from tasks.runner import Handoff, StageContext, run_stage
from workers import resources
from workers.app import app


@app.task(name=names.ANSWER_QUESTION, bind=True)
def answer_question(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=Stage.ANSWER, worker=self.request.hostname,
                     work=_answer)


def _answer(ctx: StageContext) -> Handoff:
    settings = get_settings()
    question = str(ctx.payload["question"])
    top_k = int(ctx.payload.get("top_k", 5))
    embedder = resources.embedder()
    with session_scope() as session:
        passages = hybrid_search(
            session, workspace_id=ctx.workspace_id, query=question,
            encode_query=lambda q: embedder.encode([q])[0], top_k=top_k,
            candidates=settings.search_candidates, embedding_version=embedder.model_version,
        )
    ctx.checkpoint(progress=0.5)
    answer = resources.generator().generate(question, passages)
    return ctx.succeed(asdict(answer))
