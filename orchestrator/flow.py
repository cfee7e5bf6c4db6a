"""The Prefect flow of one job: one task per stage, each stage executed on Ray.

A task runs in the flow's process: it marks its stage running, hands the stage to a Ray worker with
the resources the recipe asks for, relays the worker's progress events while it waits, then records
outputs, metrics and lineage and marks the stage done. Ray workers never need Prefect.

Resuming is the same flow run again: stages that already succeeded are skipped and their outputs feed
the next stage, so a failed or cancelled job continues where it stopped with its lineage intact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import TypeAdapter
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.caching import reuse_cached, stage_cache_key
from orchestrator.kernel_cache import provide_kernel_cache, remember_kernel_plan
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import queries
from pipelines.recipe import Recipe, StageSpec
from workers import placement
from workers.runner import SOURCE_PREFIX, StageRequest
from workers.storage import ArtifactStorage

log = logging.getLogger(__name__)

EventFn = Callable[[dict[str, Any]], None]
_POLL_S = 0.3
_PROGRESS_WRITE_S = 1.0


class StageFailed(RuntimeError):
    """A stage raised; the message carries the stage label and the original error."""


class JobCancelled(RuntimeError):
    """The job was cancelled while a stage ran."""


class TransientStageError(RuntimeError):
    """The Ray side failed (node or worker lost) after Ray's own retries: worth one more attempt."""


@dataclass
class JobRuntime:
    """What the flow needs from its host process (not Prefect parameters: never serialized)."""

    settings: Settings
    sessions: sessionmaker[Session]
    on_event: EventFn = field(default=lambda event: None)


@dataclass
class Input:
    artifact_id: str
    uri: str


def _label(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


def _source_inputs(session: Session, job_id: str, model_ref: str) -> dict[str, Input]:
    """The job's source model as an artifact (registered once per job) feeding `model` and `base_model`."""
    sources = [a for a in queries.list_artifacts(session, job_id, kind="model") if a.stage_run_id is None]
    source = sources[0] if sources else queries.add_artifact(
        session, job_id=job_id, kind="model", uri=SOURCE_PREFIX + model_ref
    )
    return {"model": Input(source.id, source.uri), "base_model": Input(source.id, source.uri)}


def _wait(runtime: JobRuntime, job_id: str, stage_run_id: str, placed: placement.Placement) -> Any:
    """Wait for the stage, relaying progress and watching for cancellation; return its outcome."""
    last_write = 0.0
    while True:
        ready, _ = ray.wait([placed.ref], timeout=_POLL_S)
        events = placed.drain()
        for event in events:
            runtime.on_event({"type": "progress", "job_id": job_id, **event})
        now = time.monotonic()
        if events and (ready or now - last_write > _PROGRESS_WRITE_S):
            last = events[-1]
            with runtime.sessions.begin() as session:
                queries.record_progress(session, stage_run_id, last["done"], last["total"], last["message"])
            last_write = now
        if ready:
            return ray.get(placed.ref)
        with runtime.sessions() as session:
            if queries.get_job(session, job_id).status == Status.cancelled:
                placement.cancel(placed)
                raise JobCancelled(f"job {job_id} was cancelled")


def _record_outcome(session: Session, job_id: str, stage_run_id: str, outcome: Any) -> dict[str, Input]:
    produced: dict[str, Input] = {}
    for art in outcome.artifacts:
        row = queries.add_artifact(
            session, job_id=job_id, stage_run_id=stage_run_id, kind=art["kind"], uri=art["uri"],
            sha256=art["sha256"], size_bytes=art["size_bytes"],
        )
        produced[art["kind"]] = Input(row.id, row.uri)
    metrics = [*outcome.metrics, ("stage_seconds", outcome.seconds, 0)]
    queries.add_metrics(session, job_id=job_id, stage_run_id=stage_run_id, metrics=metrics)
    queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="device", value=outcome.device)
    if outcome.gpu_ids:
        queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="gpu_ids",
                        value=",".join(outcome.gpu_ids))
    for note in outcome.notes:
        queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="note", value=note)
    return produced


@task(name="stage", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_is_transient)
def run_stage(runtime: JobRuntime, job_id: str, stage_run_id: str, inputs: dict[str, Input]) -> dict[str, Input]:
    """Run one stage run on Ray and record everything it produced."""
    with runtime.sessions.begin() as session:
        job = queries.get_job(session, job_id)
        stage_run = queries.get_stage_run(session, stage_run_id)
        recipe = Recipe.model_validate(job.recipe)
        spec = TypeAdapter(StageSpec).validate_python(stage_run.params)
        label = _label(stage_run.index, stage_run.kind)
        if stage_run.status == Status.failed:  # a retry of a transient failure
            queries.set_stage_status(session, stage_run_id, Status.queued)
        if spec.stage == "kernel_tune":  # choices measured by earlier runs, as an input for lineage
            cache = provide_kernel_cache(session, _storage(runtime), job_id=job_id, label=label)
            inputs = {**inputs, "kernel_cache": Input(cache.id, cache.uri)}
        input_rows = {kind: queries.get_artifact(session, item.artifact_id) for kind, item in inputs.items()}
        cache_key = stage_cache_key(kind=spec.stage, params=stage_run.params, data=job.recipe["data"],
                                    seed=recipe.seed, inputs=input_rows, code_version=job.code_version)
        queries.set_stage_status(session, stage_run_id, Status.running)
        for item in inputs.values():
            queries.add_input_edge(session, stage_run_id, item.artifact_id)
        reused = reuse_cached(session, job_id=job_id, stage_run_id=stage_run_id, cache_key=cache_key) \
            if recipe.reuse_cached else None
        if reused is not None:
            queries.set_stage_status(session, stage_run_id, Status.succeeded, cache_key=cache_key)
    if reused is not None:
        runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id, "label": label,
                          "status": "succeeded", "notes": ["cached: same inputs, parameters and code"]})
        return {a.kind: Input(a.id, a.uri) for a in reused}
    runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id, "label": label,
                      "status": "running"})
    request = StageRequest(
        job_id=job_id, stage_run_id=stage_run_id, label=label, spec=spec.model_dump(mode="json"),
        data=recipe.data.model_dump(mode="json"), seed=recipe.seed,
        inputs={kind: item.uri for kind, item in inputs.items()},
        artifact_root=runtime.settings.artifacts_url, cache_dir=str(runtime.settings.cache_dir),
    )
    placed = placement.submit(request, spec.resources)
    if placed.note:
        with runtime.sessions.begin() as session:
            queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="degraded", value=placed.note)
    try:
        outcome = _wait(runtime, job_id, stage_run_id, placed)
    except JobCancelled:
        _finish(runtime, job_id, stage_run_id, label, Status.cancelled, "job cancelled")
        raise
    except (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError) as error:
        cause = getattr(error, "cause", None) or error
        message = f"{type(cause).__name__}: {cause}"
        _finish(runtime, job_id, stage_run_id, label, Status.failed, message)
        raise StageFailed(f"stage {label} failed: {message}") from None
    except ray.exceptions.RayError as error:
        _finish(runtime, job_id, stage_run_id, label, Status.failed, f"{type(error).__name__}: {error}")
        raise TransientStageError(f"stage {label}: {type(error).__name__}") from error
    with runtime.sessions.begin() as session:
        produced = _record_outcome(session, job_id, stage_run_id, outcome)
        if spec.stage == "kernel_tune" and "kernel_plan" in produced:
            remember_kernel_plan(session, _storage(runtime), stage_run_id=stage_run_id,
                                 plan_uri=produced["kernel_plan"].uri)
        queries.set_stage_status(session, stage_run_id, Status.succeeded, cache_key=cache_key)
    runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id, "label": label,
                      "status": "succeeded", "seconds": outcome.seconds, "notes": outcome.notes})
    return produced


def _storage(runtime: JobRuntime) -> ArtifactStorage:
    return ArtifactStorage(runtime.settings.artifacts_url, runtime.settings.cache_dir / "artifacts")


def _finish(runtime: JobRuntime, job_id: str, stage_run_id: str, label: str, status: Status, error: str) -> None:
    with runtime.sessions.begin() as session:
        queries.set_stage_status(session, stage_run_id, status, error=error)
    runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id, "label": label,
                      "status": status.value, "error": error})


@flow(name="compression-job", validate_parameters=False, log_prints=False)
def compression_job(runtime: JobRuntime, job_id: str) -> str:
    """Run (or resume) every stage of job `job_id` in order; return the job's final status."""
    placement.connect(runtime.settings.ray_address, num_cpus=runtime.settings.ray_num_cpus,
                      num_gpus=runtime.settings.ray_num_gpus)
    with runtime.sessions.begin() as session:
        job = queries.set_job_status(session, job_id, Status.running)
        current = _source_inputs(session, job_id, job.recipe["model"])
        plan = [(run.id, run.index, run.kind, run.status) for run in queries.stage_runs(session, job_id)]
    runtime.on_event({"type": "job", "job_id": job_id, "status": "running"})
    try:
        for stage_run_id, index, kind, status in plan:
            with runtime.sessions() as session:
                if queries.get_job(session, job_id).status == Status.cancelled:
                    raise JobCancelled(f"job {job_id} was cancelled")
            if status == Status.succeeded:
                with runtime.sessions() as session:
                    done = queries.stage_outputs(session, stage_run_id)
                current.update({a.kind: Input(a.id, a.uri) for a in done})
                runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id,
                                  "label": _label(index, kind), "status": "skipped"})
                continue
            current.update(run_stage(runtime, job_id, stage_run_id, dict(current)))
    except JobCancelled:
        runtime.on_event({"type": "job", "job_id": job_id, "status": "cancelled"})
        return Status.cancelled.value
    except Exception as error:
        with runtime.sessions.begin() as session:
            queries.set_job_status(session, job_id, Status.failed, error=str(error))
        runtime.on_event({"type": "job", "job_id": job_id, "status": "failed", "error": str(error)})
        raise
    with runtime.sessions.begin() as session:
        queries.set_job_status(session, job_id, Status.succeeded)
    runtime.on_event({"type": "job", "job_id": job_id, "status": "succeeded"})
    return Status.succeeded.value
