"""Finding jobs whose runner died, failing them, and resuming them as their recipe allows.

A job handed to a runner records who runs it (`jobs.runner`) and a heartbeat the runner refreshes. The
service reconciles when it starts and then every `reconcile_every_s`:

- an embedded runner (`embedded:<host>:<pid>`) on this host is alive exactly when its process is;
- a Prefect flow run (`prefect:<id>`) that has not started yet is waiting for a worker, not lost, unless
  Prefect says it ended; once started, it is alive while its heartbeat is fresher than
  `runner_lost_after_s` (a SIGKILLed worker stops beating; Prefect is told the run Crashed);
- anything else is judged by its heartbeat alone.

A lost job is recorded failed ("worker lost" for a cluster runner, "interrupted" for an embedded one),
its running stage failed and the stages it never reached skipped; then, while `resumes < max_resumes`,
it is queued again and dispatched, and the flow resumes after its last finished stage.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import deployments
from orchestrator.lifecycle import requeue_job
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import queries
from orchestrator.store.models import Job, utcnow
from pipelines.recipe import Recipe

log = logging.getLogger(__name__)

DEFAULT_MAX_RESUMES = Recipe.model_fields["max_resumes"].default


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Lost:
    """Why a job's runner is gone; `by_heartbeat`: judged by a stale heartbeat (re-checked under the lock)."""

    reason: str
    by_heartbeat: bool


def lost_reason(job: Job, settings: Settings, *, cutoff: datetime) -> Lost | None:
    """Why `job`'s runner is gone, or None while it may still be alive (`cutoff`: beats before it are stale)."""
    stale = job.heartbeat_at is not None and job.heartbeat_at < cutoff
    kind, _, who = (job.runner or "").partition(":")
    if kind == "embedded":
        host, _, pid = who.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            return None if _pid_alive(int(pid)) else Lost(f"interrupted: its runner process {pid} is gone", False)
    if kind == "prefect" and job.flow_run_id and settings.prefect_api_url:
        state = deployments.state(settings, job.flow_run_id)
        if state is not None and state.is_final:
            detail = f" ({state.message})" if state.message else ""
            return Lost(f"worker lost: its flow run ended {state.name}{detail}", False)
        if state is not None and not state.has_started:
            return None  # waiting in the work pool for a free worker
        if state is not None and state.since is not None and state.since > cutoff:
            return None  # started moments ago: its flow has not claimed the job (and beaten) yet
        if stale:
            return Lost(f"worker lost: no heartbeat for over {settings.runner_lost_after_s:g} s", True)
        return None
    if stale:
        return Lost(f"interrupted: no heartbeat from {job.runner} for over {settings.runner_lost_after_s:g} s", True)
    return None


def fail_lost(session: Session, job_id: str, runner: str | None, reason: str, *,
              beat_before: datetime | None = None) -> bool:
    """Fail `job_id` if it still belongs to `runner`, has not ended and (given `beat_before`) has not beaten
    since; return whether it was failed. Re-checked under the row lock: the verdict was reached without it."""
    job = queries.get_job(session, job_id)
    session.refresh(job, with_for_update=session.bind.dialect.name == "postgresql")
    if job.runner != runner or job.status not in (Status.queued, Status.running):
        return False
    if beat_before is not None and job.heartbeat_at is not None and job.heartbeat_at >= beat_before:
        return False  # it beat in the meantime: alive after all
    for run in queries.stage_runs(session, job_id):
        if run.status == Status.running:
            queries.set_stage_status(session, run.id, Status.failed, error=reason)
    if job.status == Status.queued:
        queries.set_job_status(session, job_id, Status.running)  # failed is only reachable from running
    queries.set_job_status(session, job_id, Status.failed, error=reason)
    queries.skip_unreached(session, job_id)
    queries.add_tag(session, job_id=job_id, key="note", value=reason)
    return True


def reconcile_once(sessions: sessionmaker[Session], settings: Settings,
                   dispatch: Callable[[str], None]) -> list[str]:
    """Fail every job whose runner is gone and resume those whose recipe allows; return the failed ids."""
    cutoff = utcnow() - timedelta(seconds=settings.runner_lost_after_s)
    with sessions() as session:
        verdicts = []
        for job in queries.claimed_jobs(session):
            try:
                lost = lost_reason(job, settings, cutoff=cutoff)
            except deployments.ClusterUnavailable as error:  # no verdict without Prefect: try again later
                log.warning("reconcile: cannot ask Prefect about job %s: %s", job.id, error)
                continue
            if lost is not None:
                verdicts.append((job.id, job.runner, lost, job.flow_run_id))
    failed, resumable = [], []
    for job_id, runner, lost, flow_run_id in verdicts:
        reason = lost.reason
        with sessions.begin() as session:
            if not fail_lost(session, job_id, runner, reason, beat_before=cutoff if lost.by_heartbeat else None):
                continue
            job = queries.get_job(session, job_id)
            allowed = job.recipe.get("max_resumes", DEFAULT_MAX_RESUMES)  # rows from before the field: default
            if job.resumes < allowed:
                job.resumes += 1
                requeue_job(session, job_id)
                queries.add_tag(session, job_id=job_id, key="note",
                                value=f"resumed automatically ({job.resumes} of {allowed})")
                resumable.append(job_id)
        failed.append(job_id)
        log.warning("job %s: %s%s", job_id, reason, "; resuming it" if job_id in resumable else "")
        if flow_run_id and lost.by_heartbeat:
            try:
                deployments.mark_crashed(settings, flow_run_id, reason)
            except deployments.ClusterUnavailable as error:
                log.warning("could not mark flow run %s crashed: %s", flow_run_id, error)
    for job_id in resumable:
        dispatch(job_id)
    return failed
