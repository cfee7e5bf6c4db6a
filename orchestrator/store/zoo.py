"""Queries for the nightly model zoo: nights, their jobs, regressions and webhook deliveries.

Like `queries`, every function flushes but never commits: the caller owns the transaction. Lookups by
id raise `NotFound`. Lists are newest first and paginated with `limit`/`offset`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from orchestrator.states import Status
from orchestrator.store.errors import NotFound
from orchestrator.store.models import (
    DeliveryStatus,
    Job,
    NightStatus,
    WebhookDelivery,
    ZooNight,
    ZooNightJob,
    ZooRegression,
    utcnow,
)

# --- nights ---------------------------------------------------------------------------------------------


def create_night(session: Session, zoo: str, *, started_at: datetime | None = None) -> ZooNight:
    """A running night of `zoo`."""
    night = ZooNight(zoo=zoo, status=NightStatus.running, started_at=started_at or utcnow())
    session.add(night)
    session.flush()
    return night


def get_night(session: Session, night_id: str) -> ZooNight:
    night = session.scalar(select(ZooNight).where(ZooNight.id == night_id).options(selectinload(ZooNight.jobs)))
    if night is None:
        raise NotFound("night", night_id)
    return night


def finish_night(session: Session, night_id: str, status: NightStatus, *, summary: str | None = None) -> ZooNight:
    """Record how the night ended (not `running`) and its plain-text summary."""
    if NightStatus(status) is NightStatus.running:
        raise ValueError(f"night {night_id}: finish it as succeeded, partial or failed, not running")
    night = get_night(session, night_id)
    night.status, night.finished_at, night.summary = NightStatus(status), utcnow(), summary
    session.flush()
    return night


def set_night_report(session: Session, night_id: str, artifact_id: str) -> ZooNight:
    """Point the night at its report artifact."""
    night = get_night(session, night_id)
    night.report_artifact_id = artifact_id
    session.flush()
    return night


def list_nights(session: Session, zoo: str, *, owner: str | None = None, limit: int = 50,
                offset: int = 0) -> list[ZooNight]:
    """Nights of `zoo`, newest first, with their jobs loaded; with `owner`, only nights with a job of theirs
    (filtered before paging, so a page holds `limit` of them while they last)."""
    query = select(ZooNight).where(ZooNight.zoo == zoo)
    if owner is not None:
        theirs = (select(ZooNightJob.night_id).join(Job, Job.id == ZooNightJob.job_id)
                  .where(Job.owner == owner))
        query = query.where(ZooNight.id.in_(theirs))
    query = (query.options(selectinload(ZooNight.jobs))
             .order_by(ZooNight.started_at.desc(), ZooNight.id.desc()).limit(limit).offset(offset))
    return list(session.scalars(query))


def last_night(session: Session, zoo: str) -> ZooNight | None:
    """The most recent night of `zoo` (running or finished), None before the first."""
    nights = list_nights(session, zoo, limit=1)
    return nights[0] if nights else None


def list_zoos(session: Session) -> list[tuple[str, int, datetime]]:
    """(zoo, nights, last night's start) for every zoo that has run, by name."""
    query = (select(ZooNight.zoo, func.count(ZooNight.id), func.max(ZooNight.started_at))
             .group_by(ZooNight.zoo).order_by(ZooNight.zoo))
    return [(zoo, count, last) for zoo, count, last in session.execute(query)]


# --- a night's jobs -------------------------------------------------------------------------------------


def add_night_job(session: Session, *, night_id: str, job_id: str, model: str, recipe_name: str,
                  pair_key: str) -> ZooNightJob:
    """Record that `job_id` is the job of pair `pair_key` tonight."""
    row = ZooNightJob(night_id=night_id, job_id=job_id, model=model, recipe_name=recipe_name, pair_key=pair_key,
                      reused=False)
    session.add(row)
    session.flush()
    return row


def night_jobs(session: Session, night_id: str) -> list[ZooNightJob]:
    """The night's pair jobs in submission order, each with its job loaded."""
    get_night(session, night_id)
    query = (select(ZooNightJob).where(ZooNightJob.night_id == night_id)
             .options(selectinload(ZooNightJob.job)).order_by(ZooNightJob.id))
    return list(session.scalars(query))


def mark_reused(session: Session, night_job_id: int, reused: bool) -> None:
    row = session.get(ZooNightJob, night_job_id)
    if row is None:
        raise NotFound("night job", night_job_id)
    row.reused = reused
    session.flush()


def previous_success(session: Session, *, zoo: str, pair_key: str, before: datetime) -> ZooNightJob | None:
    """The pair's job on the last night of `zoo` started before `before` in which that job succeeded."""
    query = (
        select(ZooNightJob)
        .join(ZooNight, ZooNight.id == ZooNightJob.night_id)
        .join(Job, Job.id == ZooNightJob.job_id)
        .where(ZooNight.zoo == zoo, ZooNightJob.pair_key == pair_key, ZooNight.started_at < before,
               Job.status == Status.succeeded)
        .order_by(ZooNight.started_at.desc(), ZooNightJob.id.desc())
        .limit(1)
    )
    return session.scalar(query)


# --- regressions ----------------------------------------------------------------------------------------


def add_regression(session: Session, *, night_id: str, job_id: str, previous_job_id: str, metric: str,
                   old_value: float, new_value: float, tolerance: float, worse: str) -> ZooRegression:
    if worse not in ("higher", "lower"):
        raise ValueError(f"worse must be 'higher' or 'lower', got {worse!r}")
    row = ZooRegression(night_id=night_id, job_id=job_id, previous_job_id=previous_job_id, metric=metric,
                        old_value=float(old_value), new_value=float(new_value), tolerance=float(tolerance),
                        worse=worse, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def list_regressions(session: Session, zoo: str, *, owner: str | None = None, night_id: str | None = None,
                     limit: int = 100, offset: int = 0) -> list[ZooRegression]:
    """Regressions of `zoo` (optionally of one night, of one owner's jobs), newest night first, then by job
    and metric; the owner is filtered before paging."""
    query = select(ZooRegression).join(ZooNight, ZooNight.id == ZooRegression.night_id).where(ZooNight.zoo == zoo)
    if owner is not None:
        query = query.join(Job, Job.id == ZooRegression.job_id).where(Job.owner == owner)
    if night_id is not None:
        query = query.where(ZooRegression.night_id == night_id)
    order = (ZooNight.started_at.desc(), ZooRegression.job_id, ZooRegression.metric, ZooRegression.id)
    return list(session.scalars(query.order_by(*order).limit(limit).offset(offset)))


def night_regressions(session: Session, night_id: str) -> list[ZooRegression]:
    get_night(session, night_id)
    query = select(ZooRegression).where(ZooRegression.night_id == night_id)
    return list(session.scalars(query.order_by(ZooRegression.job_id, ZooRegression.metric, ZooRegression.id)))


# --- webhook deliveries ---------------------------------------------------------------------------------


def add_delivery(session: Session, *, night_id: str, url: str) -> WebhookDelivery:
    get_night(session, night_id)
    row = WebhookDelivery(night_id=night_id, url=url, attempts=0, status=DeliveryStatus.pending, failures=[],
                          created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def record_attempt(session: Session, delivery_id: int, *, error: str | None, final: bool) -> WebhookDelivery:
    """Count one attempt: `error` None means delivered; a failure is appended to `failures`, and `final`
    marks the delivery failed (no more attempts)."""
    row = session.get(WebhookDelivery, delivery_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise NotFound("webhook delivery", delivery_id)
    if row.status is not DeliveryStatus.pending:
        raise ValueError(f"webhook delivery {delivery_id} is already {row.status.value}")
    row.attempts += 1
    now = utcnow()
    if error is None:
        row.status, row.finished_at = DeliveryStatus.delivered, now
    else:
        row.last_error = error
        row.failures = [*row.failures, {"attempt": row.attempts, "at": now.isoformat(), "error": error}]
        if final:
            row.status, row.finished_at = DeliveryStatus.failed, now
    session.flush()
    return row


def deliveries(session: Session, night_id: str) -> list[WebhookDelivery]:
    get_night(session, night_id)
    query = select(WebhookDelivery).where(WebhookDelivery.night_id == night_id).order_by(WebhookDelivery.id)
    return list(session.scalars(query))

