"""Lineage and metrics of a job: which stage run consumed and produced which artifact."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OwnedJob, SessionDep
from api.schemas import LineageEdgePublic, LineagePublic, MetricPublic
from api.views import artifact_public
from orchestrator.store import queries

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["lineage"])


@router.get("/lineage", response_model=LineagePublic)
def get_lineage(job: OwnedJob, session: SessionDep) -> LineagePublic:
    return LineagePublic(
        job_id=job.id,
        artifacts=[artifact_public(a) for a in queries.list_artifacts(session, job.id)],
        edges=[LineageEdgePublic.model_validate(e) for e in queries.lineage_edges(session, job.id)],
    )


@router.get("/metrics", response_model=list[MetricPublic])
def get_metrics(job: OwnedJob, session: SessionDep, name: str | None = None) -> list[MetricPublic]:
    """Every recorded value (time series included), optionally of one metric name."""
    return [MetricPublic.model_validate(m) for m in queries.job_metrics(session, job.id, name=name)]
