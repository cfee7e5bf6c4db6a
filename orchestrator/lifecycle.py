"""A job's state changes that callers ask for: record, queue again, cancel. Database only, no running.

`orchestrator.service.Orchestrator` runs what these record (in this process or as Prefect flow runs);
the reconciler uses `requeue_job` to resume a job whose runner died.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from sqlalchemy.orm import Session

from orchestrator.states import Status
from orchestrator.store import queries
from orchestrator.store.models import Job
from pipelines.recipe import Recipe

TRACKED_PACKAGES = ("sparseflow", "torch", "transformers", "compressed-tensors", "prefect", "ray", "sqlalchemy")


@lru_cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = metadata.version("sparseflow")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}" if sha else version


@lru_cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def submit_job(session: Session, recipe: Recipe, *, owner: str = "local") -> Job:
    """Record a queued job and its queued stage runs."""
    stages = [(spec.stage, spec.model_dump(mode="json")) for spec in recipe.stages]
    return queries.create_job(
        session, name=recipe.name, recipe=recipe.model_dump(mode="json"), stages=stages,
        code_version=code_version(), package_versions=package_versions(), owner=owner,
    )


def requeue_job(session: Session, job_id: str, *, force: bool = False) -> Job:
    """Make a failed or cancelled job runnable again; its succeeded stages will be skipped.

    `force` also takes over a job still marked queued or running, for when the process that ran it died
    (a live one notices at its next heartbeat that the job is no longer its own and stops): its unfinished
    stage runs are recorded as failed ("interrupted") before being queued again.
    """
    job = queries.get_job(session, job_id)
    if force and job.status in (Status.queued, Status.running):
        if job.status == Status.queued:
            queries.set_job_status(session, job_id, Status.running)
        queries.set_job_status(session, job_id, Status.failed, error="interrupted: taken over by a forced resume")
    job = queries.set_job_status(session, job_id, Status.queued)
    job.runner = None
    for run in queries.stage_runs(session, job_id):
        if run.status == Status.running:
            queries.set_stage_status(session, run.id, Status.failed, error="interrupted")
        if run.status in (Status.failed, Status.cancelled, Status.skipped):
            queries.set_stage_status(session, run.id, Status.queued)
    return job


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued or running job; a running stage is stopped by the flow that watches it."""
    job = queries.set_job_status(session, job_id, Status.cancelled)
    for run in queries.stage_runs(session, job_id):
        if run.status == Status.queued:
            queries.set_stage_status(session, run.id, Status.cancelled)
    return job
