"""A night's HTML report: the store's rows of a night turned into `zoo_report` data, rendered and stored.

A zoo may mix owners, and a tenant sees only its own jobs (`orchestrator.access`), so a night gets one
report per owner of its jobs, holding only that owner's jobs, regressions and history. Each report is
stored once through the artifact storage and recorded as a `zoo_report` artifact of every job of that
owner in the night (rows sharing one URI and sha256, as the stage cache shares reused outputs), so it
is found, verified and downloaded like any artifact of the owner's. The night points at the report of
its first job's owner (the only one in a single-owner zoo).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session

from orchestrator.regressions import final_metrics
from orchestrator.store import queries
from orchestrator.store import zoo as zoo_store
from orchestrator.store.models import ZooNight, ZooNightJob
from orchestrator.zoo_report import Night, NightJob, Regression, render_html, speedups_from_metrics
from workers.storage import ArtifactStorage

REPORT_KIND = "zoo_report"
REPORT_FILE = "report.html"
TREND_NIGHTS = 14


def _aware(moment: datetime | None) -> datetime | None:
    """The store's timestamps as UTC-aware (SQLite hands them back naive)."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _job_data(session: Session, row: ZooNightJob) -> NightJob:
    job = row.job
    metrics = {name: value for name, value in final_metrics(session, row.job_id).items() if math.isfinite(value)}
    seconds = {}
    for run in queries.stage_runs(session, row.job_id):
        if run.started_at is not None and run.finished_at is not None:
            seconds[run.kind] = seconds.get(run.kind, 0.0) + (run.finished_at - run.started_at).total_seconds()
    return NightJob(model=row.model, recipe=row.recipe_name, job_id=row.job_id, status=job.status.value,
                    reused=row.reused, metrics=metrics, stage_seconds=seconds,
                    kernel_speedups=speedups_from_metrics(metrics), error=job.error)


def night_data(session: Session, night: ZooNight, owner: str | None) -> Night:
    """`night` as the report module takes it, restricted to `owner`'s jobs (None: every job)."""
    rows = [row for row in zoo_store.night_jobs(session, night.id) if owner is None or row.job.owner == owner]
    pairs = {row.job_id: row for row in rows}
    regressions = [
        Regression(model=pairs[r.job_id].model, recipe=pairs[r.job_id].recipe_name, metric=r.metric,
                   old=r.old_value, new=r.new_value, tolerance=r.tolerance if r.worse == "higher" else -r.tolerance,
                   job_id=r.job_id, previous_job_id=r.previous_job_id)
        for r in zoo_store.night_regressions(session, night.id) if r.job_id in pairs
    ]
    return Night(zoo=night.zoo, night_id=night.id, started_at=_aware(night.started_at),
                 finished_at=_aware(night.finished_at), jobs=tuple(_job_data(session, row) for row in rows),
                 regressions=tuple(regressions))


def _history(session: Session, night: ZooNight, owner: str) -> Sequence[Night]:
    """The owner's view of the zoo's earlier nights, oldest first, for the trend figure."""
    earlier = [n for n in zoo_store.list_nights(session, night.zoo, limit=TREND_NIGHTS + 1)
               if n.id != night.id and n.started_at <= night.started_at][:TREND_NIGHTS]
    return [night_data(session, n, owner) for n in reversed(earlier)]


def publish_reports(session: Session, storage: ArtifactStorage, night_id: str) -> dict[str, str]:
    """Render and store one report per owner of the night's jobs; return owner -> report artifact id
    (that of the owner's first job) and point the night at its first job's owner's report."""
    night = zoo_store.get_night(session, night_id)
    owners: dict[str, list[str]] = {}
    for row in zoo_store.night_jobs(session, night_id):
        owners.setdefault(row.job.owner, []).append(row.job_id)
    published: dict[str, str] = {}
    for owner, job_ids in owners.items():
        html = render_html(night_data(session, night, owner), _history(session, night, owner))
        with tempfile.TemporaryDirectory(prefix="sparseflow-night-") as scratch:
            local = Path(scratch) / REPORT_FILE
            local.write_text(html, encoding="utf-8")
            stored = storage.put(local, job_id=job_ids[0], label=f"zoo-{night_id}", kind=REPORT_KIND)
        rows = [queries.add_artifact(session, job_id=job_id, kind=REPORT_KIND, uri=stored.uri,
                                     sha256=stored.sha256, size_bytes=stored.size_bytes) for job_id in job_ids]
        published[owner] = rows[0].id
    if published:
        zoo_store.set_night_report(session, night_id, next(iter(published.values())))
    return published
