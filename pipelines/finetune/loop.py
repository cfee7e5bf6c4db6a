"""The masked fine-tuning loop: data per step, losses, AdamW with warmup + cosine, mask enforcement."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from pipelines.data import sample_windows, tokenize
from pipelines.finetune.losses import causal_ce, kd_kl
from pipelines.finetune.masking import MaskGuard, capture_masks
from pipelines.modelio import load_tokenizer
from pipelines.recipe import FinetuneStage
from pipelines.sources import load_text
from pipelines.stage import Metric, StageContext, StageError


@dataclass
class TrainOutcome:
    metrics: list[Metric] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)


def lr_at(step: int, spec: FinetuneStage) -> float:
    """Linear warmup over `warmup_steps` (reaching `lr` at the last warmup step), then cosine to zero."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    decay_steps = max(1, spec.steps - spec.warmup_steps)
    progress = (step - spec.warmup_steps) / decay_steps
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The RNG that picks the windows of one micro-batch: a pure function of (seed, step, micro)."""
    digest = hashlib.sha256(f"finetune:{seed}:{step}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def make_optimizer(model: PreTrainedModel, spec: FinetuneStage) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr)


def train(
    model: PreTrainedModel, teacher: PreTrainedModel | None, spec: FinetuneStage, ctx: StageContext
) -> TrainOutcome:
    """Fine-tune `model` in place for `spec.steps` optimizer steps; pruned weights stay exactly zero."""
    tokenizer = load_tokenizer(ctx.require("model"))
    ids = tokenize(tokenizer, load_text(ctx.data.calibration, "calibration", ctx.cache_dir))
    device = next(model.parameters()).device
    guard = MaskGuard(model, capture_masks(model))
    optimizer = make_optimizer(model, spec)
    outcome = TrainOutcome()
    model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    losses: list[float] = []
    for step in range(spec.steps):
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "loss_ce": 0.0, "loss_kd": 0.0}
        for micro in range(spec.grad_accum):
            batch = sample_windows(ids, spec.batch_size, spec.seq_len, step_generator(ctx.seed, step, micro))
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            ce = causal_ce(logits, batch)
            kd = torch.zeros((), device=device)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                kd = kd_kl(logits, teacher_logits, spec.temperature)
            loss = spec.alpha_ce * ce + spec.beta_kd * kd
            (loss / spec.grad_accum).backward()
            for key, value in (("loss", loss), ("loss_ce", ce), ("loss_kd", kd)):
                totals[key] += value.item() / spec.grad_accum
        guard.zero_grads()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        guard.apply()
        elapsed = time.perf_counter() - started
        tokens = spec.grad_accum * spec.batch_size * spec.seq_len
        outcome.metrics += [Metric(name, value, step) for name, value in totals.items()]
        outcome.metrics += [Metric("lr", lr, step), Metric("tokens_per_s", tokens / elapsed, step)]
        losses.append(totals["loss"])
        ctx.progress(step + 1, spec.steps, f"step {step + 1}/{spec.steps} loss {totals['loss']:.4f}")

    model.eval()
    changed = guard.changed()
    if changed:
        raise StageError(f"{changed} pruned weights became non-zero during fine-tuning")
    outcome.summary = {
        "steps": spec.steps,
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "masked_weights": guard.masked_count,
        "masked_weights_changed": changed,
        "distillation": teacher is not None,
    }
    return outcome
