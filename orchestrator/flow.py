"""The Prefect flow of one job: one task per stage, each stage executed on Ray.

The flow's only parameter is the job id, so a Prefect worker anywhere can run it: it builds its runtime
(settings, database sessions) from the environment (`orchestrator.runtime`). A task runs in the flow's
process: it marks its stage running, hands the stage to a Ray worker with the resources the recipe asks
for, relays the worker's progress events while it waits, then records outputs, metrics and lineage and
marks the stage done. Ray workers never need Prefect.

While it runs, the flow keeps the job's heartbeat fresh; a runner that dies (SIGKILL, a lost node) goes
silent and the reconciler (`orchestrator.reconcile`) fails the job and resumes it elsewhere. Resuming is
the same flow again: stages that already succeeded are skipped and their outputs feed the next stage,
so a job continues where it stopped with its lineage intact and no finished stage recomputed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled
from sqlalchemy.orm import Session

from orchestrator import access, integrity, served_inputs
from orchestrator.caching import record_source_identities, reuse_cached, stage_cache_key
from orchestrator.runtime import Heartbeat, JobRuntime, embedded_runner, runtime_for
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import queries
from orchestrator.stored_specs import stored_recipe, stored_stage_spec
from workers import placement
from workers.requests import StageRequest
from workers.storage import ArtifactStorage

log = logging.getLogger(__name__)

_POLL_S = 0.3
_PROGRESS_WRITE_S = 1.0
_CANCEL_CHECK_S = 1.0  # a store query per running job: a cancel is seen within this, a finished stage at once


class StageFailed(RuntimeError):
    """A stage raised; the message carries the stage label and the original error."""


class JobCancelled(RuntimeError):
    """The job was cancelled while a stage ran."""


class RunnerReplaced(RuntimeError):
    """This runner was presumed dead and the job was given to another one: stop without touching it."""


class TransientStageError(RuntimeError):
    """The Ray side failed (node or worker lost) after Ray's own retries: worth one more attempt."""


@dataclass
class Input:
    artifact_id: str
    uri: str


def stage_label(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def runner_names() -> tuple[str, ...]:
    """The names this flow answers to: its Prefect flow run (what a cluster dispatch records) and its process."""
    return (f"prefect:{flow_run.id}", embedded_runner()) if flow_run.id else (embedded_runner(),)


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


def _source_inputs(session: Session, job_id: str, model_ref: str, owner: str, settings: Settings
                   ) -> dict[str, Input]:
    """The job's model feeding `model` and `base_model`: another artifact of the owner's (`artifact:<id>`,
    checked again now), or a source reference registered once per job as an artifact of its own. The source
    model's and texts' content is hashed here (memoized), so that the stage cache keys on content."""
    uri, artifact_id = access.model_input(session, model_ref, owner=owner, settings=settings)
    record_source_identities(session, job_id, model_uri=uri if artifact_id is None else None,
                             memo_dir=settings.cache_dir / "content-hashes")
    if artifact_id is not None:
        return {"model": Input(artifact_id, uri), "base_model": Input(artifact_id, uri)}
    sources = [a for a in queries.list_artifacts(session, job_id, kind="model") if a.stage_run_id is None]
    source = sources[0] if sources else queries.add_artifact(session, job_id=job_id, kind="model", uri=uri)
    return {"model": Input(source.id, source.uri), "base_model": Input(source.id, source.uri)}


def _storage(runtime: JobRuntime) -> ArtifactStorage:
    return ArtifactStorage(runtime.settings.artifacts_url, runtime.settings.cache_dir / "artifacts")


def _emit_stage(runtime: JobRuntime, job_id: str, stage_run_id: str, label: str, status: str, **extra: Any) -> None:
    runtime.on_event({"type": "stage", "job_id": job_id, "stage_run_id": stage_run_id, "label": label,
                      "status": status, **extra})


def _wait(runtime: JobRuntime, job_id: str, stage_run_id: str, placed: placement.Placement,
          heartbeat: Heartbeat) -> Any:
    """Wait for the stage, relaying progress, counting Ray's own retries and watching for cancellation."""
    last_write = last_cancel_check = 0.0
    attempts_seen = 0
    while True:
        ready, _ = ray.wait([placed.ref], timeout=_POLL_S)
        events = placed.drain(final=bool(ready))
        progress = [e for e in events if e.get("kind", "progress") == "progress"]
        for event in events:
            if event.get("kind") != "attempt":
                continue
            attempts_seen += 1
            if attempts_seen > 1:  # Ray re-ran the task after its worker process died
                note = f"Ray retried the stage (attempt {attempts_seen} on Ray) after its worker process died"
                with runtime.sessions.begin() as session:
                    queries.record_stage_retry(session, stage_run_id, note)
                runtime.on_event({"type": "note", "job_id": job_id, "stage_run_id": stage_run_id, "note": note})
        for event in progress:
            runtime.on_event({"type": "progress", "job_id": job_id, **event})
        now = time.monotonic()
        if progress and (ready or now - last_write > _PROGRESS_WRITE_S):
            last = progress[-1]
            with runtime.sessions.begin() as session:
                queries.record_progress(session, stage_run_id, last["done"], last["total"], last["message"])
            last_write = now
        if ready:
            return ray.get(placed.ref)
        # a cancel first: it also stops the heartbeat (the job is no longer running), which must not read as
        # the job having been handed to another runner, or its stage would be left running in the store
        if now - last_cancel_check >= _CANCEL_CHECK_S or heartbeat.lost.is_set():
            last_cancel_check = now
            with runtime.sessions() as session:
                if queries.get_job(session, job_id).status == Status.cancelled:
                    placement.cancel(placed)
                    raise JobCancelled(f"job {job_id} was cancelled")
        if heartbeat.lost.is_set():
            placement.cancel(placed)
            raise RunnerReplaced(f"job {job_id} was handed to another runner")


def _record_outcome(session: Session, job_id: str, stage_run_id: str, outcome: Any) -> dict[str, Input]:
    produced: dict[str, Input] = {}
    for art in outcome.artifacts:
        row = queries.add_artifact(
            session, job_id=job_id, stage_run_id=stage_run_id, kind=art["kind"], uri=art["uri"],
            sha256=art["sha256"], size_bytes=art["size_bytes"],
        )
        produced[art["kind"]] = Input(row.id, row.uri)
        try:  # fingerprint the fresh bytes (sha256 just computed) so a first download need not re-hash them
            integrity.stamp(session, row)
        except Exception as error:  # only an optimisation: the first download verifies in full instead
            log.warning("artifact %s not fingerprinted: %s", row.id, error)
    metrics = [*outcome.metrics, ("stage_seconds", outcome.seconds, 0)]
    queries.add_metrics(session, job_id=job_id, stage_run_id=stage_run_id, metrics=metrics)
    queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="device", value=outcome.device)
    if outcome.gpu_ids:
        queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="gpu_ids",
                        value=",".join(outcome.gpu_ids))
    for note in outcome.notes:
        queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="note", value=note)
    return produced


def _finish(runtime: JobRuntime, job_id: str, stage_run_id: str, label: str, status: Status, error: str) -> None:
    with runtime.sessions.begin() as session:
        queries.set_stage_status(session, stage_run_id, status, error=error)
    _emit_stage(runtime, job_id, stage_run_id, label, status.value, error=error)


@task(name="stage", task_run_name="{label}", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_is_transient)
def run_stage(job_id: str, stage_run_id: str, label: str, inputs: dict[str, Input], heartbeat: Heartbeat
              ) -> dict[str, Input]:
    """Run one stage run (`label`: its task run's name) on Ray and record everything it produced."""
    runtime = heartbeat.runtime
    with runtime.sessions.begin() as session:
        job = queries.get_job(session, job_id)
        stage_run = queries.get_stage_run(session, stage_run_id)
        recipe, owner = stored_recipe(job.recipe), job.owner
        spec = stored_stage_spec(stage_run.params)
        if stage_run.status == Status.failed:  # a retry of a transient failure
            queries.set_stage_status(session, stage_run_id, Status.queued)
        for kind in spec.store_inputs:  # inputs the store serves, e.g. kernel choices measured before
            served = served_inputs.provide(kind, session, _storage(runtime), job_id=job_id, label=label)
            inputs = {**inputs, kind: Input(served.id, served.uri)}
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
        _emit_stage(runtime, job_id, stage_run_id, label, "succeeded",
                    notes=["cached: same inputs, parameters and code"])
        return {a.kind: Input(a.id, a.uri) for a in reused}
    _emit_stage(runtime, job_id, stage_run_id, label, "running")
    with runtime.sessions() as session:
        data = access.data_spec(session, recipe.data.model_dump(mode="json"), owner=owner)
    request = StageRequest(
        job_id=job_id, stage_run_id=stage_run_id, label=label, spec=spec.model_dump(mode="json"),
        data=data, seed=recipe.seed,
        inputs={kind: item.uri for kind, item in inputs.items()},
        artifact_root=runtime.settings.artifacts_url, cache_dir=str(runtime.settings.cache_dir),
    )
    placed = placement.submit(request, spec.resources)
    if placed.note:
        with runtime.sessions.begin() as session:
            queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="degraded", value=placed.note)
    try:
        outcome = _wait(runtime, job_id, stage_run_id, placed, heartbeat)
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
        for kind, item in produced.items():
            served_inputs.record(kind, session, _storage(runtime), stage_run_id=stage_run_id, uri=item.uri)
        total = queries.get_stage_run(session, stage_run_id).progress_total or 1
        queries.record_progress(session, stage_run_id, total, total, "done")  # never a stale mid-stage message
        queries.set_stage_status(session, stage_run_id, Status.succeeded, cache_key=cache_key)
    _emit_stage(runtime, job_id, stage_run_id, label, "succeeded", seconds=outcome.seconds, notes=outcome.notes)
    return produced


def _flow_run_name() -> str:
    job_id = flow_run.parameters.get("job_id", "?")
    try:
        with runtime_for(job_id).sessions() as session:
            return f"{queries.get_job(session, job_id).name}-{job_id[:8]}"
    except Exception:  # a name is cosmetic: never fail a run over it
        return f"job-{job_id[:8]}"


def _fail_job(runtime: JobRuntime, job_id: str, error: str) -> None:
    """Record the job failed, the stages it never reached skipped."""
    with runtime.sessions.begin() as session:
        queries.set_job_status(session, job_id, Status.failed, error=error)
        queries.skip_unreached(session, job_id)
    runtime.on_event({"type": "job", "job_id": job_id, "status": "failed", "error": error})


@flow(name="compression-job", flow_run_name=_flow_run_name, validate_parameters=False, log_prints=False)
def compression_job(job_id: str) -> Any:
    """Run (or resume) every stage of job `job_id` in order; return the job's final status."""
    runtime = runtime_for(job_id)
    settings = runtime.settings
    with runtime.sessions.begin() as session:
        recorded = queries.claim_job(session, job_id, None).runner  # locks the row, refreshes nothing yet
        if recorded is not None and recorded not in runner_names():  # given to another runner meanwhile
            return Cancelled(message=f"job {job_id} belongs to another runner ({recorded}); this one stops")
        runner = recorded or runner_names()[-1]
        queries.claim_job(session, job_id, runner)
        queries.add_tag(session, job_id=job_id, key="runner_process",
                        value=f"{socket.gethostname()}:{os.getpid()} parent {os.getppid()}")
        if queries.get_job(session, job_id).status == Status.cancelled:  # cancelled before it started
            return Cancelled(message=f"job {job_id} was cancelled before it started")
        job = queries.set_job_status(session, job_id, Status.running)
        owner, recipe = job.owner, stored_recipe(job.recipe)
        plan = [(run.id, run.index, run.kind, run.status) for run in queries.stage_runs(session, job_id)]
    runtime.on_event({"type": "job", "job_id": job_id, "status": "running"})
    with Heartbeat(runtime, job_id, runner) as heartbeat:
        try:
            with runtime.sessions.begin() as session:  # the policy again: settings or references may have changed
                access.check_recipe(session, recipe, owner=owner, settings=settings)
                current = _source_inputs(session, job_id, recipe.model, owner, settings)
            placement.connect(settings.ray_address, num_cpus=settings.ray_num_cpus,
                              num_gpus=settings.ray_num_gpus, bind_host=settings.ray_bind_host)
            for stage_run_id, index, kind, status in plan:
                label = stage_label(index, kind)
                with runtime.sessions() as session:
                    if queries.get_job(session, job_id).status == Status.cancelled:
                        raise JobCancelled(f"job {job_id} was cancelled")
                if status == Status.succeeded:
                    with runtime.sessions() as session:
                        done = queries.stage_outputs(session, stage_run_id)
                    current.update({a.kind: Input(a.id, a.uri) for a in done})
                    _emit_stage(runtime, job_id, stage_run_id, label, "skipped")
                    continue
                current.update(run_stage(job_id, stage_run_id, label, dict(current), heartbeat))
        except JobCancelled:
            runtime.on_event({"type": "job", "job_id": job_id, "status": "cancelled"})
            return Cancelled(message=f"job {job_id} was cancelled")
        except RunnerReplaced as error:
            log.warning("%s; this runner stops", error)
            return Cancelled(message=str(error))
        except Exception as error:
            _fail_job(runtime, job_id, str(error))
            raise
    with runtime.sessions.begin() as session:
        queries.set_job_status(session, job_id, Status.succeeded)
    runtime.on_event({"type": "job", "job_id": job_id, "status": "succeeded"})
    return Status.succeeded.value
