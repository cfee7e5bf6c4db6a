"""A job's metrics, paginated: every recorded point (per-layer values, fine-tuning time series).

The job status (`GET /v1/jobs/{job_id}`) carries only each stage's headline values; this is where the
rest lives, filtered by stage run and/or metric name.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import OwnedJob, SessionDep
from api.schemas import MetricPublic, MetricsPage
from orchestrator.store import reads

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["metrics"])

MAX_PAGE = 1000


@router.get("/metrics", response_model=MetricsPage)
def get_metrics(
    job: OwnedJob,
    session: SessionDep,
    stage_run_id: Annotated[str | None, Query(max_length=32, description="Only this stage run's points.")] = None,
    name: Annotated[str | None, Query(max_length=200, description="Only this metric.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> MetricsPage:
    """Points ordered by stage index, name and step; `total` counts all pages."""
    rows, total = reads.metrics_page(session, job.id, stage_run_id=stage_run_id, name=name, limit=limit,
                                     offset=offset)
    return MetricsPage(data=[MetricPublic.model_validate(m) for m in rows], total=total, limit=limit, offset=offset)
