"""The contract between a stage and whoever runs it.

A stage is a function `run(spec, ctx) -> StageResult`. It reads its inputs from local paths in
`ctx.inputs`, writes its outputs under `ctx.workdir`, reports progress through `ctx.progress`, and
returns what it produced. It knows nothing of Ray, Prefect, the store or artifact URLs: the worker
moves files in and out, and the orchestrator records them.

Artifact kinds (the keys of `inputs` and `outputs`):

- `model`: a directory `save_pretrained` wrote (config, safetensors, tokenizer).
- `base_model`: the job's original dense model directory (always present as an input).
- `calibration`: a safetensors file of calibration token ids and per-Linear input statistics.
- `masks`: a safetensors file of packed bitmasks, one per pruned Linear.
- `report`: a JSON file with the stage's findings.
- `kernel_plan`: a JSON file mapping Linear shapes to the chosen kernel.
- `checkpoint`: a directory a stage can resume from.
- `plot`: a PNG figure of the stage's findings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.recipe import DataSpec

ProgressFn = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, message: str) -> None:
    """Default sink: progress goes nowhere."""


@dataclass
class Metric:
    """One measurement. `step` orders a time series (e.g. a loss per training step)."""

    name: str
    value: float
    step: int = 0


@dataclass
class StageContext:
    """Everything a stage may use besides its own spec."""

    workdir: Path
    inputs: dict[str, Path]
    data: DataSpec
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None
    progress: ProgressFn = _no_progress
    checkpoint_dir: Path | None = None
    """Where a stage keeps resumable state. Unlike `workdir`, it outlives a failed or killed attempt, and
    the runner hands it back as the `checkpoint` input of the next attempt. None: keep it in `workdir`."""
    on_checkpoint: Callable[[Path], None] | None = None
    """Called with the checkpoint directory each time a stage has finished writing one (the runner
    publishes it to shared storage so an attempt on another node can resume). The directory may be
    replaced by the next checkpoint once the call returns, so a callee that keeps it copies it first."""

    def require(self, kind: str) -> Path:
        """The local path of input `kind`, or a clear error naming the missing artifact."""
        if kind not in self.inputs:
            raise StageInputError(f"this stage needs a {kind!r} artifact from an earlier stage")
        return self.inputs[kind]


@dataclass
class StageResult:
    """What a stage produced: output paths by kind, metrics, a JSON-able summary, and notes.

    Notes are plain sentences recorded as tags (e.g. "kernel tuning skipped: no CUDA GPU").
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on."""


class StageInputError(StageError):
    """A required input artifact is missing or unreadable."""
