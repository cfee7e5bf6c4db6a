"""Turning store rows into response bodies (kept out of the handlers so they stay short)."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.orm import Session

from api.schemas import ArtifactPublic, JobDetail, StageRunPublic
from orchestrator.store import queries
from orchestrator.store.models import Artifact, Job


def artifact_public(artifact: Artifact) -> ArtifactPublic:
    body = ArtifactPublic.model_validate(artifact)
    if artifact.stage_run_id is not None:
        body.download_url = f"/v1/artifacts/{artifact.id}/download"
    return body


def job_detail(session: Session, job: Job) -> JobDetail:
    """A job with its stages, each carrying the last value of its metrics and its notes."""
    last: dict[str, dict[str, float]] = defaultdict(dict)
    for metric in queries.job_metrics(session, job.id):
        last[metric.stage_run_id][metric.name] = metric.value
    notes: dict[str | None, list[str]] = defaultdict(list)
    for tag in queries.job_tags(session, job.id):
        if tag.key in ("note", "degraded"):
            notes[tag.stage_run_id].append(tag.value)
    columns = [name for name in StageRunPublic.model_fields if name not in ("metrics", "notes")]
    stages = [
        StageRunPublic(**{c: getattr(run, c) for c in columns}, metrics=last[run.id], notes=notes[run.id])
        for run in queries.stage_runs(session, job.id)
    ]
    base = {k: getattr(job, k) for k in JobDetail.model_fields if k != "stages"}
    return JobDetail(**base, stages=stages)
