"""Lineage of a job (its metrics: api/routers/metrics.py): which stage run consumed and produced which artifact."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OwnedJob, SessionDep
from api.schemas import LineageEdgePublic, LineagePublic
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
