"""Read-only queries shaped for the API's hot paths: the job status page and paginated metrics.

`GET /v1/jobs/{id}` is polled by every client watching a job, so it costs a fixed four indexed queries
whatever the job's size (job, stage runs, the last value of a short list of headline metrics per stage,
notes), each selecting only the columns the answer needs. A job's full metrics (hundreds of per-layer
values, fine-tuning time series) are paged separately.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Row, Select, bindparam, func, select
from sqlalchemy.orm import Session

from orchestrator.store.models import Job, Metric, StageRun, Tag

JOB_COLUMNS = ("id", "name", "status", "owner", "created_at", "started_at", "finished_at", "error",
               "code_version", "flow_run_id", "resumes", "recipe", "package_versions")
STAGE_COLUMNS = ("id", "index", "kind", "status", "attempt", "started_at", "finished_at", "error",
                 "progress_done", "progress_total", "progress_message")
NOTE_KEYS = ("note", "degraded")

# Built once: constructing a select costs more CPU than SQLite takes to run it (compiled forms are cached).
# On the tables' columns, not the mapped classes': a Core select needs no ORM compile state, and a CLI
# process that only reads a status never configures the mappers (~0.1 s of its start).
_jobs, _stage_runs, _metrics, _tags = (model.__table__.c for model in (Job, StageRun, Metric, Tag))
_JOB = select(*(_jobs[c] for c in JOB_COLUMNS)).where(_jobs.id == bindparam("job_id"))
_STAGES = (select(*(_stage_runs[c] for c in STAGE_COLUMNS))
           .where(_stage_runs.job_id == bindparam("job_id")).order_by(_stage_runs["index"]))
_NOTES = (select(_tags.stage_run_id, _tags.value)
          .where(_tags.job_id == bindparam("job_id"), _tags.key.in_(NOTE_KEYS)).order_by(_tags.id))


@lru_cache(maxsize=8)
def _last_values(names: tuple[str, ...]) -> Select[Any]:
    # By stage run, not by job: (stage_run_id, name) leads the metrics index, so only the rows of these
    # names are visited (on SQLite from the index alone), never the job's hundreds of other points.
    stage_ids = select(_stage_runs.id).where(_stage_runs.job_id == bindparam("job_id")).scalar_subquery()
    latest = (
        select(func.max(_metrics.id).label("id"))
        .where(_metrics.stage_run_id.in_(stage_ids), _metrics.name.in_(names))
        .group_by(_metrics.stage_run_id, _metrics.name)
        .subquery()
    )
    return select(_metrics.stage_run_id, _metrics.name, _metrics.value).join(latest, _metrics.id == latest.c.id)


def _connection(db: Session | Connection) -> Connection:
    """The status reads run on a bare connection when they can (a Session adds bookkeeping per request)."""
    return db.connection() if isinstance(db, Session) else db


def job_row(db: Session | Connection, job_id: str) -> Row[Any] | None:
    """The job's status-page columns, or None if there is no such job."""
    return _connection(db).execute(_JOB, {"job_id": job_id}).first()


def stage_rows(db: Session | Connection, job_id: str) -> Sequence[Row[Any]]:
    """The job's stage runs in order, without their params."""
    return _connection(db).execute(_STAGES, {"job_id": job_id}).all()


def last_metric_values(db: Session | Connection, job_id: str, names: Iterable[str]) -> dict[str, dict[str, float]]:
    """stage run id -> {name: last recorded value} for the metrics in `names` (last = latest appended)."""
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for stage_run_id, name, value in _connection(db).execute(_last_values(tuple(names)), {"job_id": job_id}):
        values[stage_run_id][name] = value
    return values


def notes(db: Session | Connection, job_id: str) -> dict[str | None, list[str]]:
    """stage run id (None: the job's own) -> its notes and recorded degradations, in order."""
    found: dict[str | None, list[str]] = defaultdict(list)
    for stage_run_id, value in _connection(db).execute(_NOTES, {"job_id": job_id}):
        found[stage_run_id].append(value)
    return found


def metrics_page(
    session: Session, job_id: str, *, stage_run_id: str | None, name: str | None, limit: int, offset: int
) -> tuple[list[Metric], int]:
    """One page of the job's metric points (by stage index, name, step) and how many match in all."""
    where = [Metric.job_id == job_id]
    if stage_run_id is not None:
        where.append(Metric.stage_run_id == stage_run_id)
    if name is not None:
        where.append(Metric.name == name)
    total = session.scalar(select(func.count()).select_from(Metric).where(*where)) or 0
    query = (
        select(Metric)
        .join(StageRun, StageRun.id == Metric.stage_run_id)
        .where(*where)
        .order_by(StageRun.index, Metric.name, Metric.step, Metric.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query)), total
