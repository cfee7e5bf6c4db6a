"""Job lifecycle for callers (API, CLI, schedules): submit, dispatch, run, resume, cancel, reconcile.

`Orchestrator` owns the database engine and hands jobs to runners. In embedded mode (the default) it
runs each job's flow in a small thread pool of this process. In cluster mode (`SPARSEFLOW_PREFECT_API_URL`
set) it runs nothing: it creates a flow run of the `compression-job` deployment, which a Prefect worker
(`sparseflow worker`) picks up. Either way the same flow runs the job, and the reconciler resumes jobs
whose runner died.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import deployments, reconcile
from orchestrator.flow import compression_job
from orchestrator.lifecycle import cancel_job, code_version, package_versions, requeue_job, submit_job
from orchestrator.runtime import EventFn, JobRuntime, embedded_runner, registered
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import db, queries

log = logging.getLogger(__name__)

__all__ = ["Orchestrator", "cancel_job", "code_version", "package_versions", "requeue_job", "submit_job"]


_prefect_lock = threading.Lock()
_prefect_ready = threading.Event()


def _ensure_prefect_api() -> None:
    """Reach Prefect's API once per process before any flow does: in embedded mode that starts its
    ephemeral server, which concurrent first flows would otherwise each try to start (and corrupt)."""
    with _prefect_lock:
        if _prefect_ready.is_set():
            return
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.api_healthcheck()
        _prefect_ready.set()


class DispatchFailed(RuntimeError):
    """The job was recorded but could not be handed to a runner (the cluster is unreachable)."""


class Orchestrator:
    """Database + dispatcher, configured from `Settings`."""

    def __init__(self, settings: Settings, *, max_workers: int | None = None) -> None:
        settings.ensure_dirs()
        self.settings = settings
        self.engine = db.make_engine(settings.database)
        db.migrate(self.engine)
        self.sessions: sessionmaker[Session] = db.session_factory(self.engine)
        self._pool = ThreadPoolExecutor(max_workers or settings.max_concurrent_jobs, thread_name_prefix="job")
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None

    @property
    def mode(self) -> str:
        return self.settings.mode

    def run(self, job_id: str, on_event: EventFn | None = None) -> str:
        """Run job `job_id` to the end in this thread; returns its final status (raises if it failed)."""
        with self.sessions.begin() as session:
            queries.claim_job(session, job_id, embedded_runner())
        _ensure_prefect_api()
        runtime = JobRuntime(self.settings, self.sessions, on_event or (lambda event: None))
        try:
            with registered(job_id, runtime):
                state = compression_job(job_id, return_state=True)
        except Exception as error:  # the flow never started (e.g. Prefect's ephemeral server did not come up)
            self._fail_unstarted(job_id, f"{type(error).__name__}: {error}")
            raise
        if state.is_cancelled():
            return Status.cancelled.value
        return state.result()

    def _fail_unstarted(self, job_id: str, error: str) -> None:
        """Record a job whose flow could not even start as failed (resumable), never left queued."""
        with self.sessions.begin() as session:
            if queries.get_job(session, job_id).status == Status.queued:
                queries.set_job_status(session, job_id, Status.running)
                queries.set_job_status(session, job_id, Status.failed, error=f"not started: {error}")
                queries.skip_unreached(session, job_id)

    def start(self, job_id: str) -> Future | str:
        """Hand job `job_id` to a runner: this process's pool (embedded) or a Prefect flow run (cluster)."""
        if self.mode == "cluster":
            return self._submit_flow_run(job_id)
        with self.sessions.begin() as session:
            queries.claim_job(session, job_id, embedded_runner())
        future = self._pool.submit(self.run, job_id)
        future.add_done_callback(lambda f: f.exception() and log.warning("job %s: %s", job_id, f.exception()))
        return future

    def _submit_flow_run(self, job_id: str) -> str:
        with self.sessions() as session:
            job = queries.get_job(session, job_id)
            name = f"{job.name}-{job_id[:8]}"
        try:
            flow_run_id = deployments.submit(self.settings, job_id, name=name)
        except deployments.ClusterUnavailable as error:
            self._fail_unstarted(job_id, f"not submitted to Prefect: {error}")
            raise DispatchFailed(str(error)) from error
        with self.sessions.begin() as session:
            queries.claim_job(session, job_id, f"prefect:{flow_run_id}")
            queries.get_job(session, job_id).flow_run_id = flow_run_id
        log.info("job %s: flow run %s", job_id, flow_run_id)
        return flow_run_id

    def cancel(self, session: Session, job_id: str) -> None:
        """Cancel the job in the store (its flow stops its Ray task within a poll) and, in cluster mode, a
        flow run that has not started yet."""
        job = cancel_job(session, job_id)
        if self.mode == "cluster" and job.flow_run_id:
            try:
                deployments.cancel(self.settings, job.flow_run_id)
            except deployments.ClusterUnavailable as error:  # the flow still sees the cancel when it starts
                log.warning("job %s: could not cancel flow run %s: %s", job_id, job.flow_run_id, error)

    def reconcile(self) -> list[str]:
        """Fail (and resume, as recipes allow) every job whose runner is gone; return their ids."""
        return reconcile.reconcile_once(self.sessions, self.settings, self._dispatch_quietly)

    def _dispatch_quietly(self, job_id: str) -> None:
        try:
            self.start(job_id)
        except DispatchFailed as error:
            log.warning("job %s could not be resumed: %s", job_id, error)

    def start_reconciler(self) -> None:
        """Reconcile now, then every `reconcile_every_s` from a daemon thread, until `close`."""
        self._safe_reconcile()

        def loop() -> None:
            while not self._stop.wait(self.settings.reconcile_every_s):
                self._safe_reconcile()

        self._reconciler = threading.Thread(target=loop, name="reconciler", daemon=True)
        self._reconciler.start()

    def _safe_reconcile(self) -> None:
        try:
            self.reconcile()
        except Exception:  # a failed round must not stop the next one
            log.exception("reconcile failed")

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()
