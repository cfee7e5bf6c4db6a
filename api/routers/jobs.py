"""Jobs: submit, list, inspect, cancel, resume."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import CurrentUser, OrchestratorDep, OwnedJob, SessionDep
from api.schemas import JobCreate, JobDetail, JobPublic, JobsPublic
from api.views import job_detail, job_status
from orchestrator import service
from orchestrator.states import Status
from orchestrator.store import queries

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobDetail)
def create_job(body: JobCreate, session: SessionDep, user: CurrentUser, orchestrator: OrchestratorDep) -> JobDetail:
    """Record the job; with `start` (the default) it runs in the background right away."""
    job = service.submit_job(session, body.recipe, owner=user)
    session.commit()
    if body.start:
        orchestrator.start(job.id)
    return job_detail(session, job)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, user: CurrentUser, status: Status | None = None, limit: int = 50,
              offset: int = 0) -> JobsPublic:
    jobs = queries.list_jobs(session, status=status, owner=user, limit=min(limit, 500), offset=offset)
    return JobsPublic(data=[JobPublic.model_validate(j) for j in jobs], count=len(jobs))


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: str, session: SessionDep, user: CurrentUser) -> JobDetail:
    """State, stages with their headline metrics and notes; full metrics: `GET /v1/jobs/{job_id}/metrics`."""
    return job_status(session, job_id, user)


@router.post("/{job_id}/cancel", response_model=JobDetail)
def cancel_job(job: OwnedJob, session: SessionDep) -> JobDetail:
    """Cancel a queued or running job (409 if it already ended)."""
    service.cancel_job(session, job.id)
    session.commit()
    return job_detail(session, job)


@router.post("/{job_id}/resume", response_model=JobDetail)
def resume_job(job: OwnedJob, session: SessionDep, orchestrator: OrchestratorDep) -> JobDetail:
    """Run a failed or cancelled job again from its first unfinished stage (409 otherwise)."""
    service.requeue_job(session, job.id)
    session.commit()
    orchestrator.start(job.id)
    return job_detail(session, job)
