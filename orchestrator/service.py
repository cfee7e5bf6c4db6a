"""Job lifecycle for callers (API, CLI, schedules): submit, run, resume, cancel.

`Orchestrator` owns the database engine and a small thread pool that runs job flows in this process
(the embedded mode `sparseflow serve` uses). In production the same flow runs from a Prefect worker.
"""

from __future__ import annotations

import logging
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.flow import EventFn, JobRuntime, compression_job
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import db, queries
from orchestrator.store.models import Job
from pipelines.recipe import Recipe

log = logging.getLogger(__name__)

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

    `force` also takes a job still marked running, for when the process that ran it died: its
    unfinished stage runs are recorded as failed ("interrupted") before being queued again.
    """
    if force and queries.get_job(session, job_id).status == Status.running:
        queries.set_job_status(session, job_id, Status.failed, error="interrupted: the runner process died")
    job = queries.set_job_status(session, job_id, Status.queued)
    for run in queries.stage_runs(session, job_id):
        if run.status == Status.running:
            queries.set_stage_status(session, run.id, Status.failed, error="interrupted")
        if run.status in (Status.failed, Status.cancelled):
            queries.set_stage_status(session, run.id, Status.queued)
    return job


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued or running job; a running stage is stopped by the flow that watches it."""
    job = queries.set_job_status(session, job_id, Status.cancelled)
    for run in queries.stage_runs(session, job_id):
        if run.status == Status.queued:
            queries.set_stage_status(session, run.id, Status.cancelled)
    return job


class Orchestrator:
    """Database + in-process job runner, configured from `Settings`."""

    def __init__(self, settings: Settings, *, max_workers: int | None = None) -> None:
        settings.ensure_dirs()
        self.settings = settings
        self.engine = db.make_engine(settings.database)
        db.migrate(self.engine)
        self.sessions: sessionmaker[Session] = db.session_factory(self.engine)
        self._pool = ThreadPoolExecutor(max_workers or settings.max_concurrent_jobs, thread_name_prefix="job")

    def run(self, job_id: str, on_event: EventFn | None = None) -> str:
        """Run job `job_id` to the end in this thread; returns its final status."""
        runtime = JobRuntime(self.settings, self.sessions, on_event or (lambda event: None))
        return compression_job(runtime, job_id)

    def start(self, job_id: str) -> Future:
        """Run job `job_id` in the background pool."""
        future = self._pool.submit(self.run, job_id)
        future.add_done_callback(lambda f: f.exception() and log.warning("job %s: %s", job_id, f.exception()))
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()
