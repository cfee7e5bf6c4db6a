"""Cluster mode's Prefect side: the work pool, the `compression-job` deployment, and its flow runs.

`register` (what `sparseflow deploy` runs, idempotent) creates the process work pool and the deployment
whose entrypoint is the installed module path `orchestrator.flow.compression_job`, so a worker needs no
code download: the same package (image) is installed everywhere. The API then only creates flow runs
(`submit`), with the job id as their one parameter, and asks Prefect about them when it reconciles.

The deployment names the command that runs a flow run (`ENGINE_COMMAND`, Prefect's own engine module). With
no command configured, Prefect's process worker first starts a workspace supervisor, a Python process that
imports Prefect to run the deployment's pull steps and then execs the engine, which imports Prefect again:
a second interpreter start per job, for pull steps this deployment does not have. `python` is the
interpreter the worker runs (`sparseflow worker` puts its directory first on PATH; in the image it is the
only one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Crashed

from orchestrator.settings import Settings

log = logging.getLogger(__name__)

ENTRYPOINT = "orchestrator.flow.compression_job"
FLOW_NAME = "compression-job"
ENGINE_COMMAND = "python -m prefect.engine"
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
NOT_STARTED = {StateType.SCHEDULED, StateType.PENDING}


class ClusterUnavailable(RuntimeError):
    """The Prefect server could not be reached or has no deployment to run jobs with."""


@dataclass(frozen=True)
class FlowRunState:
    type: StateType
    name: str
    message: str | None
    since: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.type in FINAL

    @property
    def has_started(self) -> bool:
        return self.type not in NOT_STARTED


@contextmanager
def _client(settings: Settings) -> Iterator[SyncPrefectClient]:
    if not settings.prefect_api_url:
        raise ClusterUnavailable("cluster mode needs SPARSEFLOW_PREFECT_API_URL")
    try:
        # Prefect's client reads its own setting, fixed when prefect was imported: override it here
        with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}), get_client(sync_client=True) as client:
            yield client
    except (ObjectNotFound, ClusterUnavailable):
        raise
    except Exception as error:
        if "prefect" in type(error).__module__ or "httpx" in type(error).__module__:
            raise ClusterUnavailable(f"Prefect at {settings.prefect_api_url}: {type(error).__name__}: {error}") \
                from error
        raise


def register(settings: Settings, *, pool_concurrency: int | None = None) -> UUID:
    """Create the work pool (type `process`) and the deployment if missing; return the deployment id."""
    with _client(settings) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=settings.work_pool, type="process",
                                                   concurrency_limit=pool_concurrency))
            log.info("created work pool %s", settings.work_pool)
        except ObjectAlreadyExists:
            pass
        flow_id = client.create_flow_from_name(FLOW_NAME)
        return client.create_deployment(
            flow_id=flow_id,
            name=settings.deployment,
            entrypoint=ENTRYPOINT,
            work_pool_name=settings.work_pool,
            job_variables={"command": ENGINE_COMMAND},
            parameter_openapi_schema={
                "type": "object",
                "title": "Parameters",
                "properties": {"job_id": {"type": "string", "title": "job_id", "position": 0}},
                "required": ["job_id"],
            },
            enforce_parameter_schema=True,
            description="One sparseflow compression job: its stages, run on Ray. Parameter: the job id.",
        )


def submit(settings: Settings, job_id: str, *, name: str) -> str:
    """Create a flow run of the deployment for `job_id`; return its id."""
    with _client(settings) as client:
        try:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{settings.deployment}")
        except ObjectNotFound:
            raise ClusterUnavailable(
                f"no deployment {FLOW_NAME}/{settings.deployment} on the Prefect server: run `sparseflow deploy`"
            ) from None
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"job_id": job_id}, name=name,
                                                     tags=["sparseflow"])
    return str(run.id)


def state(settings: Settings, flow_run_id: str) -> FlowRunState | None:
    """The flow run's current state, or None if Prefect does not know it."""
    with _client(settings) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return None
    if run.state is None:
        return None
    return FlowRunState(run.state.type, run.state.name, run.state.message, run.state.timestamp)


def cancel(settings: Settings, flow_run_id: str) -> None:
    """Cancel a flow run that has not started yet; a running one stops itself when it sees the job cancelled
    (within a poll), cancelling its Ray task, and then ends Cancelled."""
    with _client(settings) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is not None and run.state.type in NOT_STARTED:
            client.set_flow_run_state(run.id, Cancelled(message="job cancelled"), force=True)


def mark_crashed(settings: Settings, flow_run_id: str, message: str) -> None:
    """Record in Prefect that a flow run's runner was lost (its heartbeat stopped), unless it already ended."""
    with _client(settings) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return
        if run.state is None or run.state.type not in FINAL:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
