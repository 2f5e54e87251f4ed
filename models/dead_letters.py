"""Counting the dead-letter store (jobs in state `dead`) for the periodic digest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from models.entities import Job, JobState


@dataclass(frozen=True, slots=True)
class DeadCount:
    stage: str
    error_code: str | None
    total: int
    new: int  # died after `since` (and not after `until`)


def count_dead(session: Session, *, since: datetime | None, until: datetime) -> list[DeadCount]:
    """Dead jobs by stage and error code, most first: how many there are, and how many died
    in (`since`, `until`] (all of them when `since` is None). Every workspace is counted."""
    died_in_window = Job.finished_at <= until
    if since is not None:
        died_in_window = died_in_window & (Job.finished_at > since)
    new = func.sum(case((died_in_window, 1), else_=0))
    rows = session.execute(
        select(Job.stage, Job.error_code, func.count().label("total"), new.label("new"))
        .where(Job.state == JobState.DEAD)
        .group_by(Job.stage, Job.error_code)
        .order_by(func.count().desc(), Job.stage, Job.error_code)
    )
    return [DeadCount(stage=r.stage, error_code=r.error_code, total=int(r.total),
                      new=int(r.new or 0)) for r in rows]
