"""Jobs: submit, list, inspect, cancel, resume."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from api.deps import CurrentUser, OrchestratorDep, OwnedJob, SessionDep
from api.polled import PollingUser, status_response
from api.schemas import JobCreate, JobDetail, JobPublic, JobsPublic
from api.views import job_detail
from orchestrator import access, service
from orchestrator.runtime import embedded_runner
from orchestrator.states import Status
from orchestrator.store import queries

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobDetail)
def create_job(body: JobCreate, session: SessionDep, user: CurrentUser, orchestrator: OrchestratorDep) -> JobDetail:
    """Record the job; with `start` (the default) it runs in the background right away."""
    access.check_recipe(session, body.recipe, owner=user, settings=orchestrator.settings)
    job = service.submit_job(session, body.recipe, owner=user)
    session.commit()
    if body.start:
        orchestrator.start(job.id)
        session.refresh(job)  # the dispatch recorded its runner (and flow run) in its own transaction
    return job_detail(session, job)


MAX_PAGE = 500
MAX_OFFSET = 1_000_000_000  # beyond any owner's job count; bounded so the SQL integer cannot overflow


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Jobs per page.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip, newest first.")] = 0,
) -> JobsPublic:
    """The caller's jobs, newest first, one page at a time."""
    jobs = queries.list_jobs(session, status=status, owner=user, limit=limit, offset=offset)
    return JobsPublic(data=[JobPublic.model_validate(j) for j in jobs], count=len(jobs))


@router.post("/{job_id}/start", response_model=JobDetail)
def start_job(job: OwnedJob, session: SessionDep, orchestrator: OrchestratorDep, request: Request) -> JobDetail:
    """Run a job recorded with `start: false` (409 unless it is queued and has never been handed to a runner)."""
    ran = [run.index for run in job.stage_runs if run.status != Status.queued or run.attempt or run.started_at]
    if ran or not queries.reserve_start(session, job.id, by=f"starting:{embedded_runner()}"):  # one of racing starts
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job.id} is {job.status.value}{' and was already started' if job.status == Status.queued else ''}: "
            "only a queued job that never ran can be started (a failed or cancelled one: POST .../resume)",
        )
    session.commit()  # the reservation is seen by every other request before the job is handed on
    orchestrator.start(job.id)
    session.refresh(job)
    forget_status(request, job.id)
    return job_detail(session, job)


@router.get("/{job_id}", response_model=JobDetail)
async def get_job(job_id: str, request: Request, user: PollingUser) -> Response:
    """State, stages with their headline metrics and notes; full metrics: `GET /v1/jobs/{job_id}/metrics`."""
    return await status_response(request, job_id, user)


@router.post("/{job_id}/cancel", response_model=JobDetail)
def cancel_job(job: OwnedJob, session: SessionDep, orchestrator: OrchestratorDep, request: Request) -> JobDetail:
    """Cancel a queued or running job (409 if it already ended); a running stage stops within seconds."""
    orchestrator.cancel(session, job.id)
    session.commit()
    forget_status(request, job.id)
    return job_detail(session, job)


@router.post("/{job_id}/resume", response_model=JobDetail)
def resume_job(
    job: OwnedJob,
    session: SessionDep,
    orchestrator: OrchestratorDep,
    request: Request,
    force: Annotated[bool, Query(description="Also take over a job still recorded queued or running whose "
                                 "runner died (a live runner notices and stops).")] = False,
) -> JobDetail:
    """Run a failed or cancelled job again from its first unfinished stage (409 otherwise, unless `force`)."""
    service.requeue_job(session, job.id, force=force)
    session.commit()
    orchestrator.start(job.id)
    session.refresh(job)
    forget_status(request, job.id)
    return job_detail(session, job)


def forget_status(request: Request, job_id: str) -> None:
    """This process changed the job: its next status read goes to the store, not to `api.status_cache`."""
    request.app.state.status_cache.forget(job_id)
