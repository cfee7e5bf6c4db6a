"""The lineage store's only door: every read and write the API and the flow make.

Transactions: every function flushes (so ids, defaults and constraint errors appear at the call) but
never commits. The caller owns the unit of work, e.g. recording a stage's artifacts, metrics, tags
and its `succeeded` status together::

    with sessions.begin() as session:      # commits on success, rolls back on error
        queries.add_artifact(session, ...)
        queries.set_stage_status(session, stage_run_id, Status.succeeded)

Lookups by id raise `NotFound`; status changes outside the transition table raise
`InvalidTransition`; inconsistent arguments (a stage run of another job, a negative progress count,
a non-finite metric, a kernel choice measured without a GPU) raise `ValueError`. Status changes lock
the row (`SELECT ... FOR UPDATE`) on PostgreSQL, so the API cancelling a job and the runner
finishing it cannot both win.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from orchestrator.states import Status, check_transition
from orchestrator.store.errors import NotFound
from orchestrator.store.models import (
    KERNEL_ENVIRONMENT_FIELDS,
    Artifact,
    Direction,
    Job,
    KernelPlanRow,
    LineageEdge,
    Metric,
    StageRun,
    Tag,
    utcnow,
)

_Row = TypeVar("_Row", Job, StageRun, Artifact)
_ENTITY = {Job: "job", StageRun: "stage_run", Artifact: "artifact"}


def create_job(
    session: Session,
    *,
    name: str,
    recipe: dict[str, Any],
    stages: list[tuple[str, dict[str, Any]]],
    code_version: str,
    package_versions: dict[str, str],
    owner: str = "local",
) -> Job:
    """A queued job with one queued stage run per `(kind, params)` in `stages`, indexed from 0."""
    job = Job(
        name=name,
        status=Status.queued,
        recipe=recipe,
        code_version=code_version,
        package_versions=package_versions,
        owner=owner,
        created_at=utcnow(),
        stage_runs=[
            StageRun(index=index, kind=kind, params=params, status=Status.queued, attempt=0)
            for index, (kind, params) in enumerate(stages)
        ],
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id).options(selectinload(Job.stage_runs)))
    if job is None:
        raise NotFound("job", job_id)
    return job


def list_jobs(
    session: Session,
    *,
    status: Status | None = None,
    owner: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    """Jobs newest first, optionally only those with `status` and/or `owner`."""
    query = select(Job).options(selectinload(Job.stage_runs))
    if status is not None:
        query = query.where(Job.status == Status(status))
    if owner is not None:
        query = query.where(Job.owner == owner)
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query))


def stage_runs(session: Session, job_id: str) -> list[StageRun]:
    _require(session, Job, job_id)
    query = select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.index)
    return list(session.scalars(query))


def get_stage_run(session: Session, stage_run_id: str) -> StageRun:
    return _require(session, StageRun, stage_run_id)


def set_job_status(session: Session, job_id: str, status: Status, *, error: str | None = None) -> Job:
    """Move a job to `status`: `started_at` is set on its first run, `finished_at` (and `error`) when
    it ends; queuing it again (resume) clears both."""
    job = _require(session, Job, job_id, lock=True)
    status = Status(status)
    check_transition("job", job.status, status, ident=job_id)
    now = _apply_status(job, status, error)
    if status is Status.running and job.started_at is None:
        job.started_at = now
    session.flush()
    return job


def set_stage_status(
    session: Session,
    stage_run_id: str,
    status: Status,
    *,
    error: str | None = None,
    cache_key: str | None = None,
) -> StageRun:
    """Move a stage run to `status`; entering `running` starts a new attempt (`attempt` += 1 and
    `started_at` = now, so timings are per attempt). `cache_key`, when given, is stored."""
    run = _require(session, StageRun, stage_run_id, lock=True)
    status = Status(status)
    check_transition("stage_run", run.status, status, ident=stage_run_id)
    now = _apply_status(run, status, error)
    if status is Status.running:
        run.attempt += 1
        run.started_at = now
    if cache_key is not None:
        run.cache_key = cache_key
    session.flush()
    return run


def record_progress(session: Session, stage_run_id: str, done: int, total: int, message: str | None) -> None:
    """Overwrite a stage run's progress; `total` 0 means unknown."""
    if done < 0 or total < 0 or (total and done > total):
        raise ValueError(f"progress of stage run {stage_run_id}: need 0 <= done <= total, got {done}/{total}")
    run = _require(session, StageRun, stage_run_id)
    run.progress_done, run.progress_total, run.progress_message = done, total, message
    session.flush()


def add_artifact(
    session: Session,
    *,
    job_id: str,
    kind: str,
    uri: str,
    sha256: str | None = None,
    size_bytes: int | None = None,
    stage_run_id: str | None = None,
) -> Artifact:
    """Record an artifact of `job_id`; with `stage_run_id` it is that run's output (an edge is added),
    without it a source such as the input model reference."""
    _require(session, Job, job_id)
    if stage_run_id is not None:
        _require_stage_of_job(session, stage_run_id, job_id)
    artifact = Artifact(
        job_id=job_id,
        stage_run_id=stage_run_id,
        kind=kind,
        uri=uri,
        sha256=sha256,
        size_bytes=size_bytes,
        created_at=utcnow(),
    )
    session.add(artifact)
    session.flush()
    if stage_run_id is not None:
        session.add(LineageEdge(stage_run_id=stage_run_id, artifact_id=artifact.id, direction=Direction.output))
        session.flush()
    return artifact


def add_input_edge(session: Session, stage_run_id: str, artifact_id: str) -> None:
    """Record that a stage run read an artifact (of any job: cached outputs are shared); idempotent."""
    _require(session, StageRun, stage_run_id)
    _require(session, Artifact, artifact_id)
    existing = session.scalar(
        select(LineageEdge.id).where(
            LineageEdge.stage_run_id == stage_run_id,
            LineageEdge.artifact_id == artifact_id,
            LineageEdge.direction == Direction.input,
        )
    )
    if existing is None:
        session.add(LineageEdge(stage_run_id=stage_run_id, artifact_id=artifact_id, direction=Direction.input))
        session.flush()


def get_artifact(session: Session, artifact_id: str) -> Artifact:
    return _require(session, Artifact, artifact_id)


def list_artifacts(session: Session, job_id: str, *, kind: str | None = None) -> list[Artifact]:
    """A job's artifacts in creation order, optionally only those of `kind`."""
    _require(session, Job, job_id)
    query = select(Artifact).where(Artifact.job_id == job_id)
    if kind is not None:
        query = query.where(Artifact.kind == kind)
    return list(session.scalars(query.order_by(Artifact.created_at, Artifact.id)))


def stage_outputs(session: Session, stage_run_id: str) -> list[Artifact]:
    """Artifacts written by a stage run (those with an output edge from it), in creation order."""
    _require(session, StageRun, stage_run_id)
    query = (
        select(Artifact)
        .join(LineageEdge, LineageEdge.artifact_id == Artifact.id)
        .where(LineageEdge.stage_run_id == stage_run_id, LineageEdge.direction == Direction.output)
        .order_by(Artifact.created_at, Artifact.id)
    )
    return list(session.scalars(query))


def add_metrics(session: Session, *, job_id: str, stage_run_id: str, metrics: Iterable[tuple[str, float, int]]) -> int:
    """Append `(name, value, step)` points, all stamped now; return how many were added.

    Values must be finite: SQLite cannot store NaN, and a NaN loss is a failure to report, not a point.
    """
    _require_stage_of_job(session, stage_run_id, job_id)
    now = utcnow()
    rows = []
    for name, value, step in metrics:
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} at step {step} of stage run {stage_run_id}: {value} is not finite")
        rows.append(
            {
                "job_id": job_id,
                "stage_run_id": stage_run_id,
                "name": name,
                "value": float(value),
                "step": int(step),
                "timestamp": now,
            }
        )
    if rows:
        session.execute(insert(Metric), rows)
    return len(rows)


def job_metrics(session: Session, job_id: str, *, name: str | None = None) -> list[Metric]:
    """A job's metric points ordered by stage index, name and step (then insertion)."""
    _require(session, Job, job_id)
    query = select(Metric).join(StageRun, StageRun.id == Metric.stage_run_id).where(Metric.job_id == job_id)
    if name is not None:
        query = query.where(Metric.name == name)
    return list(session.scalars(query.order_by(StageRun.index, Metric.name, Metric.step, Metric.id)))


def add_tag(session: Session, *, job_id: str, key: str, value: str, stage_run_id: str | None = None) -> Tag:
    """Append a tag; keys may repeat (several `note` tags on one stage run are all kept)."""
    _require(session, Job, job_id)
    if stage_run_id is not None:
        _require_stage_of_job(session, stage_run_id, job_id)
    tag = Tag(job_id=job_id, stage_run_id=stage_run_id, key=key, value=value)
    session.add(tag)
    session.flush()
    return tag


def job_tags(session: Session, job_id: str) -> list[Tag]:
    """A job's tags (its own and its stage runs') in insertion order."""
    _require(session, Job, job_id)
    return list(session.scalars(select(Tag).where(Tag.job_id == job_id).order_by(Tag.id)))


def lineage_edges(session: Session, job_id: str) -> list[LineageEdge]:
    """Edges of a job's stage runs, by stage index, inputs before outputs."""
    _require(session, Job, job_id)
    query = (
        select(LineageEdge)
        .join(StageRun, StageRun.id == LineageEdge.stage_run_id)
        .where(StageRun.job_id == job_id)
        .order_by(StageRun.index, LineageEdge.direction, LineageEdge.id)
    )
    return list(session.scalars(query))


def find_cached_stage(session: Session, cache_key: str, *, owner: str) -> StageRun | None:
    """The most recently finished succeeded stage run with `cache_key` among `owner`'s jobs.

    The cache never crosses owners: a hit would tell one tenant that another ran the same model on the
    same data, and hand it artifacts stored under the other's job, gone when that job is deleted.
    """
    query = (
        select(StageRun)
        .join(Job, Job.id == StageRun.job_id)
        .where(StageRun.cache_key == cache_key, StageRun.status == Status.succeeded, Job.owner == owner)
        .order_by(StageRun.finished_at.desc(), StageRun.id.desc())
        .limit(1)
    )
    return session.scalar(query)


def upsert_kernel_choices(
    session: Session,
    *,
    stage_run_id: str,
    environment: dict[str, Any],
    dtype: str,
    entries: Iterable[tuple[str, int, dict[str, Any]]],
) -> int:
    """Store measured kernel choices `(shape "<out>x<in>", tokens, choice)` of one environment and dtype.

    An entry with the key of a stored one replaces its choice, measuring stage run and time (one
    `INSERT ... ON CONFLICT DO UPDATE`, so concurrent jobs cannot collide); within `entries` the last
    one of a key wins. Return how many entries were written.
    """
    _require(session, StageRun, stage_run_id)
    env = _environment_key(environment)
    if not env["gpu"]:
        raise ValueError("kernel choices measured without a GPU are not cached: environment has no 'gpu'")
    now = utcnow()
    rows = {
        (shape, int(tokens)): {**env, "dtype": dtype, "shape": shape, "tokens": int(tokens), "choice": dict(choice),
                               "stage_run_id": stage_run_id, "created_at": now}
        for shape, tokens, choice in entries
    }
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    make_insert = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}.get(dialect)
    if make_insert is None:
        raise ValueError(f"upsert_kernel_choices supports PostgreSQL and SQLite, not {dialect!r}")
    statement = make_insert(KernelPlanRow).values(list(rows.values()))
    statement = statement.on_conflict_do_update(
        index_elements=[*KERNEL_ENVIRONMENT_FIELDS, "dtype", "shape", "tokens"],
        set_={c: statement.excluded[c] for c in ("choice", "stage_run_id", "created_at")},
    )
    session.execute(statement)
    return len(rows)


def cached_kernel_choices(
    session: Session, *, environment: dict[str, Any] | None = None, dtype: str | None = None
) -> list[KernelPlanRow]:
    """Cached kernel choices, optionally of one environment and/or dtype, by shape then token count."""
    query = select(KernelPlanRow)
    if environment is not None:
        query = query.where(*(getattr(KernelPlanRow, f) == v for f, v in _environment_key(environment).items()))
    if dtype is not None:
        query = query.where(KernelPlanRow.dtype == dtype)
    order = (KernelPlanRow.gpu, KernelPlanRow.dtype, KernelPlanRow.shape, KernelPlanRow.tokens, KernelPlanRow.id)
    # populate_existing: an upsert in this session bypasses the identity map
    return list(session.scalars(query.order_by(*order).execution_options(populate_existing=True)))


def _environment_key(environment: dict[str, Any]) -> dict[str, str]:
    """Environment fields as stored: strings, "" for unknown; other keys are refused."""
    unknown = set(environment) - set(KERNEL_ENVIRONMENT_FIELDS)
    if unknown:
        raise ValueError(f"environment has unknown fields {sorted(unknown)}; known: {list(KERNEL_ENVIRONMENT_FIELDS)}")
    return {f: "" if environment.get(f) is None else str(environment[f]) for f in KERNEL_ENVIRONMENT_FIELDS}


def _require(session: Session, model: type[_Row], ident: str, *, lock: bool = False) -> _Row:
    # A locked read must hit the database, not the identity map.
    row = session.get(model, ident, with_for_update=lock or None, populate_existing=lock)
    if row is None:
        raise NotFound(_ENTITY[model], ident)
    return row


def _require_stage_of_job(session: Session, stage_run_id: str, job_id: str) -> StageRun:
    run = _require(session, StageRun, stage_run_id)
    if run.job_id != job_id:
        raise ValueError(f"stage run {stage_run_id} belongs to job {run.job_id}, not {job_id}")
    return run


def _apply_status(row: Job | StageRun, status: Status, error: str | None) -> datetime:
    """Set the status and the bookkeeping that every entity shares; return the time used."""
    if error is not None and not status.is_terminal:
        raise ValueError(f"error given for non-terminal status {status.value!r}")
    now = utcnow()
    row.status = status
    if status.is_terminal:
        row.finished_at = now
        row.error = error
    elif status is Status.queued:
        row.finished_at = None
        row.error = None
    return now


# --- runners and liveness -------------------------------------------------------------------------------
# A job that is being run has a `runner` (who: "embedded:<host>:<pid>" or "prefect:<flow run id>") and a
# `heartbeat_at` the runner refreshes while it works. A queued or running job whose beat went stale has no
# live runner: the reconciler fails it and, as its recipe allows, resumes it elsewhere.


def claim_job(session: Session, job_id: str, runner: str | None) -> Job:
    """Record `runner` as the one running (or about to run) `job_id`, with a fresh heartbeat.

    The row is locked first, so a caller may read who holds it; `runner` None only takes that lock.
    """
    job = _require(session, Job, job_id, lock=True)
    if runner is not None:
        job.runner, job.heartbeat_at = runner, utcnow()
        session.flush()
    return job


def reserve_start(session: Session, job_id: str, by: str) -> bool:
    """Mark a queued job that was never handed to a runner as being started by `by`, in one conditional
    UPDATE: of concurrent starts exactly one gets True. The reservation carries a heartbeat, so should its
    process die before a real runner takes over, the reconciler finds the job silent and fails it."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == Status.queued, Job.runner.is_(None),
                          Job.flow_run_id.is_(None), Job.started_at.is_(None))
        .values(runner=by, heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def beat(session: Session, job_id: str, runner: str) -> bool:
    """Refresh the heartbeat of `job_id` if `runner` still owns it; False means it was taken over or ended."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.runner == runner, Job.status.in_((Status.queued, Status.running)))
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def claimed_jobs(session: Session) -> list[Job]:
    """Queued or running jobs handed to a runner: the ones whose runner may have died."""
    query = select(Job).where(Job.status.in_((Status.queued, Status.running)), Job.runner.is_not(None))
    return list(session.scalars(query))


def skip_unreached(session: Session, job_id: str) -> int:
    """Mark the queued stage runs of an ended job `skipped` (it never reached them); return how many."""
    runs = [run for run in stage_runs(session, job_id) if run.status == Status.queued]
    for run in runs:
        set_stage_status(session, run.id, Status.skipped)
    return len(runs)


def record_stage_retry(session: Session, stage_run_id: str, note: str) -> StageRun:
    """A new attempt of a running stage that the cluster retried by itself (its worker process died):
    count it, restart its clock and progress, and say why in a note."""
    run = _require(session, StageRun, stage_run_id, lock=True)
    run.attempt += 1
    run.started_at = utcnow()
    run.progress_done, run.progress_total, run.progress_message = 0, 0, "retrying"
    session.add(Tag(job_id=run.job_id, stage_run_id=run.id, key="note", value=note))
    session.flush()
    return run
