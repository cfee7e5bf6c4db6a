"""Running one stage in isolation: what a Ray worker executes.

`execute_stage` takes a plain, serializable `StageRequest` (artifact URIs, never models or tensors),
brings the inputs to local paths, runs the stage from `pipelines/`, stores the outputs and returns a
`StageOutcome`. It emits progress events and never touches job state: the orchestrator owns that.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter

from pipelines.recipe import DataSpec, StageSpec
from pipelines.sources import resolve_model
from pipelines.stage import StageContext
from pipelines.stages import get_stage
from workers.progress import ProgressSink
from workers.storage import ArtifactStorage

log = logging.getLogger(__name__)

SOURCE_PREFIX = "source:"
"""Input URIs starting with this name a model reference (builtin id, hub id, local path), not a stored file."""


@dataclass
class StageRequest:
    job_id: str
    stage_run_id: str
    label: str
    spec: dict[str, Any]
    data: dict[str, Any]
    seed: int
    inputs: dict[str, str]
    artifact_root: str
    cache_dir: str


@dataclass
class StageOutcome:
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    gpu_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def pick_device() -> torch.device:
    """The GPU Ray assigned to this task if there is one, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs, so device 0 is always ours.
    """
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def attempt_checkpoint_dir(request: StageRequest) -> Path:
    """Resumable state of one stage run, kept across its attempts (a retry after a killed worker included).

    It lives under the node's cache directory: a retry on the same node resumes; on a multi-node cluster
    this directory must be on shared storage (the Helm chart's artifacts volume) for every node to see it.
    """
    return Path(request.cache_dir) / "checkpoints" / request.stage_run_id


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
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):  # an earlier attempt got this far
        inputs.setdefault("checkpoint", checkpoint_dir)
        sink.emit(0, 1, "resuming from the last checkpoint")
    workdir = Path(tempfile.mkdtemp(prefix=f"sparseflow-{request.label}-"))
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
        )
        result = get_stage(spec.stage)(spec, ctx)
        stored = [
            storage.put(path, job_id=request.job_id, label=request.label, kind=kind)
            for kind, path in result.outputs.items()
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sink.flush()
    return StageOutcome(
        artifacts=[vars(a) for a in stored],
        metrics=[(m.name, float(m.value), int(m.step)) for m in result.metrics],
        summary=result.summary,
        notes=list(result.notes),
        device=str(device),
        seconds=time.perf_counter() - started,
    )
