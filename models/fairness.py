"""Fairness between workspaces: per-workspace in-flight caps, kept in the database.

A workspace's jobs run in *lanes*: `ingest` (documents and their parts, every stage) and
`answer` (questions, so a question never waits behind its own workspace's uploads). A job is
*in flight* while it is queued with its message published (or about to be), running or
retrying: whatever the broker's queues and the worker pools hold of the workspace. When a
lane of a workspace has `cap` jobs in flight, a new job of it is recorded *held*: queued, with
no message. Each time one of the workspace's jobs leaves flight (it ended, was cancelled or
split into parts), its oldest held jobs are dispatched up to the cap, after that commit; the
reconciler does the same for every workspace, round-robin, so a dispatch that a killed process
missed is made up within one reconcile interval. A hand-off to the next stage, a retry, a
requeue on shutdown keep the job's slot: they are the same job, still in flight.

So a workspace that uploads thousands of documents has at most `cap` of them in any queue or
pool, and another workspace's upload waits behind those, not behind thousands. Celery still
moves and runs every message; the database only decides when one is sent.

Every decision is taken in the transaction that changes the count, under the workspace's row
lock (`quotas.lock_workspace`; SQLite serialises writers anyway), with one SQL count: two API
processes or two finishing workers cannot both take the last slot. The only overshoot left is
a job created in flight before a cap was lowered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import Select, bindparam, exists, false, func, select, true
from sqlalchemy.orm import Session

from models import ledger
from models.entities import Job, JobKind, JobState, Workspace
from models.quotas import lock_workspace

INGEST: Final = "ingest"
ANSWER: Final = "answer"
LANES: Final[dict[str, tuple[str, ...]]] = {
    # Parts first: a held part finishes a document already begun.
    INGEST: (JobKind.INGEST_PART, JobKind.INGEST),
    ANSWER: (JobKind.ANSWER,),
}
LANE_OF_KIND: Final = {kind: lane for lane, kinds in LANES.items() for kind in kinds}
IN_FLIGHT_STATES: Final = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)
"""Not held and in one of these states: in flight (a held job is always queued)."""


def lane_of(kind: str) -> str:
    return LANE_OF_KIND[kind]


@dataclass(frozen=True, slots=True)
class Room:
    """A lane of one workspace as a new job finds it."""

    in_flight: int
    held: bool
    """Older jobs of the lane are held: a new one queues behind them."""

    def admits(self, cap: int | None) -> bool:
        """Whether a new job may be published now (else it is created held)."""
        return cap is None or (self.in_flight < cap and not self.held)

    def frees(self, cap: int | None) -> bool:
        """Held jobs wait although there is room (a dispatch was missed): dispatch them."""
        return self.held and (cap is None or self.in_flight < cap)


def room(session: Session, *, workspace_id: str, lane: str) -> Room:
    """The lane's jobs in flight and whether any are held, in one statement (both read from
    `ix_jobs_workspace_lane` alone). Call it under `lock_workspace` to act on it."""
    count, waiting = session.execute(_ROOM[lane], {"workspace_id": workspace_id}).one()
    return Room(in_flight=int(count), held=bool(waiting))


def _room_statement(kinds: tuple[str, ...]) -> Select[tuple[int, bool]]:
    workspace = bindparam("workspace_id")
    in_flight = (
        select(func.count()).select_from(Job)
        .where(Job.workspace_id == workspace, Job.state.in_(IN_FLIGHT_STATES),
               Job.held == false(), Job.kind.in_(kinds))
        .scalar_subquery()
    )
    held = exists().where(Job.workspace_id == workspace, Job.state == JobState.QUEUED,
                          Job.held == true(), Job.kind.in_(kinds))
    return select(in_flight, held)


# Built once (every upload runs it under its workspace's lock; building a statement and its
# cache key costs more CPU than running it).
_ROOM: Final = {lane: _room_statement(kinds) for lane, kinds in LANES.items()}
# (and after every job that ends; the parameter is not named after a column, so the statement
# can join a transition's UPDATE, see `ledger.succeed_at_once`)
HAS_HELD: Final = {lane: select(exists().where(
    Job.workspace_id == bindparam("of_workspace"), Job.state == JobState.QUEUED,
    Job.held == true(), Job.kind.in_(kinds))) for lane, kinds in LANES.items()}
"""Per lane: whether any job of the lane is held in the workspace `of_workspace`."""


def has_held(session: Session, *, workspace_id: str, lane: str) -> bool:
    """Whether any job of the lane waits: the cheap test before a dispatch's write."""
    return bool(session.scalar(HAS_HELD[lane], {"of_workspace": workspace_id}))


def admit(session: Session, *, workspace_id: str, lane: str) -> Room:
    """In the transaction that creates a job, before it: lock the workspace (again, if the
    quota checks did) and read the lane's room; `.admits(cap)` says whether to create the job
    to be published after commit, else held."""
    lock_workspace(session, workspace_id=workspace_id)
    return room(session, workspace_id=workspace_id, lane=lane)


def dispatch(
    session: Session, *, workspace_id: str, lane: str, cap: int | None, limit: int | None = None,
) -> list[ledger.Dispatch]:
    """Take the oldest held jobs of the lane out of hold, as many as its free slots (and at
    most `limit`); publish the returned jobs after commit. Under the workspace's lock, so
    concurrent dispatches and uploads never take the same slot twice."""
    lock_workspace(session, workspace_id=workspace_id)
    free = limit
    if cap is not None:
        free = cap - room(session, workspace_id=workspace_id, lane=lane).in_flight
        free = free if limit is None else min(free, limit)
    if free is not None and free <= 0:
        return []
    job_ids: list[str] = []
    for kind in LANES[lane]:
        want = None if free is None else free - len(job_ids)
        if want is not None and want <= 0:
            break
        job_ids += session.scalars(
            select(Job.id)
            .where(Job.workspace_id == workspace_id, Job.state == JobState.QUEUED,
                   Job.held == true(), Job.kind == kind)
            .order_by(Job.created_at, Job.id)
            .limit(want)
        ).all()
    return ledger.dispatch_held(session, job_ids=job_ids)


def free_slots(session: Session, *, workspace_id: str, lane: str, cap: int | None) -> int | None:
    """Slots the lane of a workspace has free now (None: uncapped); a read, for planning."""
    if cap is None:
        return None
    return max(0, cap - room(session, workspace_id=workspace_id, lane=lane).in_flight)


def workspaces_with_held(session: Session, *, lane: str) -> list[str]:
    """Every workspace with a held job in the lane (one index probe per workspace)."""
    return list(session.scalars(
        select(Workspace.id)
        .where(exists().where(Job.workspace_id == Workspace.id, Job.state == JobState.QUEUED,
                              Job.held == true(), Job.kind.in_(LANES[lane])))
        .order_by(Workspace.id)
    ))


def held_position(session: Session, job: Job) -> int | None:
    """How many held jobs of its workspace's lane `dispatch` takes before `job` (None when it
    is not held)."""
    if not job.held or job.state != JobState.QUEUED:
        return None
    kinds = LANES[lane_of(job.kind)]
    earlier = (Job.created_at < job.created_at) | (
        (Job.created_at == job.created_at) & (Job.id < job.id))
    ahead = (Job.kind == job.kind) & earlier
    first = kinds[:kinds.index(job.kind)]
    if first:  # kinds taken first (parts before documents)
        ahead = ahead | Job.kind.in_(first)
    return int(session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.workspace_id == job.workspace_id, Job.state == JobState.QUEUED,
               Job.held == true(), Job.kind.in_(kinds), ahead)
    ) or 0)
