"""Running one stage in isolation: what a Ray worker executes.

`execute_stage` takes a plain, serializable `StageRequest` (artifact URIs, never models or tensors),
brings the inputs to local paths, runs the stage from `pipelines/`, stores the outputs and returns a
`StageOutcome`. It emits progress events and never touches job state: the orchestrator owns that.

Resumable state goes through the artifact root too (`workers.checkpoints`): every checkpoint a stage
writes is published under `<root>/_checkpoints/<job_id>/<stage_run_id>/`, and an attempt starting on
any node first fetches the latest one, so a retry after a dead worker resumes wherever Ray places it.

Node caches (`cache_dir`) stay on the node, except the few worth sharing (evaluate's dense
perplexity), which `workers.shared_cache` mirrors under the artifact root around the stage; its
docstring lists every cache and why it is shared or not. Calibration data is not a cache but an
artifact (kind `calibration`) and is stored like any other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import TypeAdapter

from pipelines.recipe import DataSpec, StageSpec
from pipelines.sources import resolve_model
from pipelines.stage import StageContext
from pipelines.stages import get_stage
from workers.checkpoints import CheckpointPublisher, RemoteCheckpoints
from workers.progress import ProgressSink
from workers.requests import SOURCE_PREFIX, StageOutcome, StageRequest
from workers.shared_cache import shared_cache_for, sync
from workers.storage import ArtifactStorage, remove_local

log = logging.getLogger(__name__)

def pick_device() -> torch.device:
    """The GPU Ray assigned to this task if there is one, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs, so device 0 is always ours.
    """
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def attempt_checkpoint_dir(request: StageRequest) -> Path:
    """The node-local working copy of one stage run's resumable state.

    The stage writes its checkpoints here; each one is also published under the artifact root, and
    an attempt starting on any node fetches the latest published one into this directory first.
    """
    return Path(request.cache_dir) / "checkpoints" / request.stage_run_id


def remote_checkpoints(request: StageRequest) -> RemoteCheckpoints:
    """Where the checkpoints of this stage run are published: `<root>/_checkpoints/<job>/<stage run>/`."""
    return RemoteCheckpoints(request.artifact_root, request.job_id, request.stage_run_id)


def _restore_checkpoint(remote: RemoteCheckpoints, local: Path, notes: list[str]) -> bool:
    """Bring the latest published checkpoint into `local`; True when there is one to resume from.

    A published checkpoint wins over the local working copy (another node may have got further). If
    none was published, a local working copy left by an earlier attempt on this node is used; if the
    published one cannot be fetched, the attempt says so and falls back the same way.
    """
    try:
        if remote.fetch(local):
            return True
    except OSError as error:
        log.warning("could not fetch the checkpoint from %s: %s", remote.uri, error)
        notes.append(f"published checkpoint unusable ({type(error).__name__}: {error}); not resumed from it")
    return local.is_dir() and any(local.iterdir())


def _resolve_inputs(request: StageRequest, storage: ArtifactStorage) -> dict[str, Path]:
    cache = Path(request.cache_dir)
    local: dict[str, Path] = {}
    for kind, uri in request.inputs.items():
        if uri.startswith(SOURCE_PREFIX):
            local[kind] = resolve_model(uri[len(SOURCE_PREFIX) :], cache)
        else:
            local[kind] = storage.local_path(uri)
    return local


def execute_stage(request: StageRequest, sink: ProgressSink | None = None) -> StageOutcome:
    """Run the stage `request.spec` names and store what it produces."""
    started = time.perf_counter()
    spec = TypeAdapter(StageSpec).validate_python(request.spec)
    storage = ArtifactStorage(request.artifact_root, Path(request.cache_dir) / "artifacts")
    device = pick_device()
    sink = sink or ProgressSink(None, request.stage_run_id)
    sink.emit(0, 1, f"starting on {device}")
    inputs = _resolve_inputs(request, storage)
    checkpoint_dir = attempt_checkpoint_dir(request)
    # only a stage that checkpoints looks for, publishes and discards shared checkpoints (storage round trips)
    remote = remote_checkpoints(request) if spec.resumable else None
    notes: list[str] = []
    if remote is not None and _restore_checkpoint(remote, checkpoint_dir, notes):  # an earlier attempt got here
        inputs.setdefault("checkpoint", checkpoint_dir)
        sink.emit(0, 1, "resuming from the last checkpoint")
    shared = shared_cache_for(spec.stage, request.artifact_root, Path(request.cache_dir))
    sync(shared, "pull")
    publisher = CheckpointPublisher(remote, checkpoint_dir.parent / ".publishing" / request.stage_run_id) \
        if remote is not None else None
    workdir = Path(tempfile.mkdtemp(prefix=f"sparseflow-{request.label}-"))
    try:
        try:
            torch.manual_seed(request.seed)
            ctx = StageContext(
                workdir=workdir,
                inputs=inputs,
                data=DataSpec.model_validate(request.data),
                seed=request.seed,
                device=device,
                cache_dir=Path(request.cache_dir),
                progress=sink.emit,
                checkpoint_dir=checkpoint_dir,
                on_checkpoint=publisher,
            )
            result = get_stage(spec.stage)(spec, ctx)
        except BaseException:
            if publisher is not None:
                publisher.close(flush=True)  # the next attempt resumes from the newest checkpoint we have
            raise
        if publisher is not None:
            publisher.close(flush=False)
        sync(shared, "push")
        stored = [
            storage.put(path, job_id=request.job_id, label=request.label, kind=kind)
            for kind, path in result.outputs.items()
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if remote is not None:
        remote.discard()  # the stage is done: its resumable state is no longer needed anywhere
        notes += [f"checkpoint not published: {error}" for error in publisher.errors[-1:]]
    remove_local(checkpoint_dir)
    sink.flush()
    return StageOutcome(
        artifacts=[vars(a) for a in stored],
        metrics=[(m.name, float(m.value), int(m.step)) for m in result.metrics],
        summary=result.summary,
        notes=list(result.notes) + notes,
        device=str(device),
        seconds=time.perf_counter() - started,
    )
