"""Resumable fine-tuning checkpoints (artifact kind `checkpoint`).

A checkpoint directory holds::

    trainable.safetensors   the trainable parameters (all weights, or only the LoRA factors)
    optimizer.pt            the AdamW state (moments and step counts)
    rng.pt                  torch's CPU RNG state
    trainer.json            steps done, the metrics so far, and the spec's fingerprint

Masks are not stored: a resumed run recaptures them from its input model, the same pruned model the
interrupted run started from. A checkpoint is written to a sibling temp dir and renamed over the old
one, so a kill mid-write leaves the previous checkpoint intact; a file of a written checkpoint is never
rewritten in place, so whoever is told of a checkpoint (`StageContext.on_checkpoint`: the worker, which
publishes it to the artifact root for an attempt on another node) may hard-link its files and read them
at leisure while training goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.recipe import FinetuneStage
from pipelines.stage import Metric, StageInputError

# Fields that may differ between an interrupted run and its resumption.
_FREE_FIELDS = {"checkpoint_every", "resources", "teacher_cache", "gradient_checkpointing"}


def fingerprint(spec: FinetuneStage) -> dict[str, Any]:
    """The spec fields that determine the training trajectory."""
    return spec.model_dump(mode="json", exclude=_FREE_FIELDS)


@dataclass
class Checkpoint:
    step: int
    metrics: list[Metric]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, metrics: list[Metric],
    spec: FinetuneStage,
) -> Path:
    """Write a checkpoint after `step` optimizer steps into `path`, replacing any older one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    state = {"step": step, "spec": fingerprint(spec), "metrics": [[m.name, m.value, m.step] for m in metrics]}
    (tmp / "trainer.json").write_text(json.dumps(state))
    os.chmod(tmp, 0o755)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, spec: FinetuneStage) -> Checkpoint:
    """Read a checkpoint, refusing one written for a different training trajectory."""
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as error:
        raise StageInputError(f"checkpoint {path} is unreadable: {error}") from error
    ours = fingerprint(spec)
    differing = sorted(k for k in set(ours) | set(state["spec"]) if ours.get(k) != state["spec"].get(k))
    if differing:
        raise StageInputError(f"checkpoint {path} was written with different settings: {', '.join(differing)}")
    return Checkpoint(
        step=int(state["step"]),
        metrics=[Metric(name, value, step) for name, value, step in state["metrics"]],
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
    )


@torch.no_grad()
def restore(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's trainable parameters, optimizer state and RNG state into a freshly built run."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(checkpoint.trainable):
        missing = sorted(set(params) ^ set(checkpoint.trainable))[:5]
        raise StageInputError(f"checkpoint does not match the model's trainable parameters: {missing}")
    for name, value in checkpoint.trainable.items():
        params[name].copy_(value)
    optimizer.load_state_dict(checkpoint.optimizer)
    torch.set_rng_state(checkpoint.rng)
