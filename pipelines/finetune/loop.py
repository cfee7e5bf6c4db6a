"""The masked fine-tuning loop: data per step, losses, AdamW with warmup + cosine, masks, checkpoints."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from pipelines.data import sample_windows, tokenize
from pipelines.finetune.checkpoint import load_checkpoint, restore, save_checkpoint
from pipelines.finetune.lora import attach_lora, merge_lora
from pipelines.finetune.losses import causal_ce, hidden_mse, kd_kl, kd_kl_topk
from pipelines.finetune.masking import MaskGuard, capture_masks
from pipelines.finetune.teacher import Teacher
from pipelines.modelio import load_model, load_tokenizer
from pipelines.recipe import FinetuneStage
from pipelines.sources import load_text
from pipelines.stage import Metric, StageContext, StageError

CHECKPOINT_DIR = "checkpoint"


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


def make_optimizer(params: list[torch.nn.Parameter], spec: FinetuneStage) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms or biases)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr)


def autocast_for(spec: FinetuneStage, device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA under `precision: auto`, or wherever `precision: bf16`; fp32 otherwise."""
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
    if not bf16:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Activation (gradient) checkpointing on or off; transformers 5 renamed the methods."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def _teacher(spec: FinetuneStage, ctx: StageContext, ids: torch.Tensor, autocast, notes: list[str]) -> Teacher | None:
    if spec.beta_kd == 0 and spec.gamma_hidden == 0:
        return None
    cache_root = None
    if spec.teacher_cache:
        if ctx.cache_dir is None:
            notes.append("teacher_cache ignored: the stage has no cache_dir, so the teacher ran live")
        else:
            cache_root = Path(ctx.cache_dir) / "teacher_logits"
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    bf16 = autocast is not nullcontext
    data_digest = f"{digest}|seed={ctx.seed}|batch={spec.batch_size}|seq={spec.seq_len}|bf16={bf16}"
    return Teacher(ctx.require("base_model"), lambda d: load_model(d, device=ctx.device), spec.teacher_topk,
                   hidden=spec.gamma_hidden > 0, autocast=autocast, cache_root=cache_root, data_digest=data_digest)


def _micro_loss(model, teacher: Teacher | None, batch: torch.Tensor, step: int, micro: int, spec: FinetuneStage,
                autocast) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha*CE + beta*T^2*KL + gamma*hidden-MSE for one micro-batch, and its parts as floats."""
    with autocast():
        out = model(input_ids=batch, use_cache=False, output_hidden_states=spec.gamma_hidden > 0)
    ce = causal_ce(out.logits, batch)
    loss = spec.alpha_ce * ce
    parts = {"loss_ce": ce.item(), "loss_kd": 0.0}
    if teacher is not None:
        target = teacher(batch, step, micro)
        if spec.beta_kd > 0:
            if target.logits is not None:
                kd = kd_kl(out.logits, target.logits, spec.temperature)
            else:
                kd = kd_kl_topk(out.logits, target.top_values, target.top_indices, spec.temperature)
            loss = loss + spec.beta_kd * kd
            parts["loss_kd"] = kd.item()
        if spec.gamma_hidden > 0:
            mse = hidden_mse(out.hidden_states[1:], target.hidden_states)
            loss = loss + spec.gamma_hidden * mse
            parts["loss_hidden"] = mse.item()
    parts["loss"] = loss.item()
    return loss, parts


def train(model: PreTrainedModel, spec: FinetuneStage, ctx: StageContext) -> TrainOutcome:
    """Fine-tune `model` in place for `spec.steps` optimizer steps; pruned weights stay exactly zero.

    Resumes from `ctx.inputs["checkpoint"]` when present; writes `ctx.workdir/checkpoint` every
    `spec.checkpoint_every` steps. With `lora_rank > 0` only masked LoRA factors train and are merged
    into the weights at the end.
    """
    tokenizer = load_tokenizer(ctx.require("model"))
    ids = tokenize(tokenizer, load_text(ctx.data.calibration, "calibration", ctx.cache_dir))
    device = next(model.parameters()).device
    autocast = autocast_for(spec, device)
    outcome = TrainOutcome()
    masks = capture_masks(model)
    if spec.gradient_checkpointing:
        _checkpointing(model, True)
    if spec.lora_rank:
        params, guard = attach_lora(model, masks, spec.lora_rank, spec.lora_alpha), None
    else:
        params, guard = [p for p in model.parameters() if p.requires_grad], MaskGuard(model, masks)
    optimizer = make_optimizer(params, spec)
    teacher = _teacher(spec, ctx, ids, autocast, outcome.notes)

    start, metrics = 0, []
    if "checkpoint" in ctx.inputs:
        checkpoint = load_checkpoint(ctx.inputs["checkpoint"], spec)
        restore(model, optimizer, checkpoint)
        start, metrics = checkpoint.step, checkpoint.metrics
        outcome.notes.append(f"resumed from a checkpoint after step {start}")
    checkpoint_dir = ctx.checkpoint_dir or ctx.workdir / CHECKPOINT_DIR

    model.train()
    for step in range(start, spec.steps):
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(spec.grad_accum):
            batch = sample_windows(ids, spec.batch_size, spec.seq_len, step_generator(ctx.seed, step, micro))
            loss, parts = _micro_loss(model, teacher, batch.to(device), step, micro, spec, autocast)
            (loss / spec.grad_accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / spec.grad_accum
        if guard is not None:
            guard.zero_grads()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        if guard is not None:
            guard.apply()
        elapsed = time.perf_counter() - started
        tokens = spec.grad_accum * spec.batch_size * spec.seq_len
        metrics += [Metric(name, value, step) for name, value in totals.items()]
        metrics += [Metric("lr", lr, step), Metric("tokens_per_s", tokens / elapsed, step)]
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, model, optimizer, step + 1, metrics, spec)
            if ctx.on_checkpoint is not None:
                ctx.on_checkpoint(checkpoint_dir)
        ctx.progress(step + 1, spec.steps, f"step {step + 1}/{spec.steps} loss {totals['loss']:.4f}")

    model.eval()
    if spec.gradient_checkpointing:
        _checkpointing(model, False)
    if spec.lora_rank:
        merge_lora(model)
    changed = MaskGuard(model, masks).changed()
    if changed:
        raise StageError(f"{changed} pruned weights became non-zero during fine-tuning")
    if checkpoint_dir.is_dir():
        outcome.outputs["checkpoint"] = checkpoint_dir
    if teacher is not None and teacher.cache_dir is not None:
        outcome.notes.append(f"teacher logits: {teacher.hits} cached, {teacher.misses} computed")
    losses = [m.value for m in metrics if m.name == "loss"]
    outcome.metrics = metrics
    outcome.summary = {
        "steps": spec.steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "masked_weights": sum(int(m.sum()) for m in masks.values()),
        "masked_weights_changed": changed,
        "distillation": teacher is not None,
        "lora_rank": spec.lora_rank,
        "bf16": autocast is not nullcontext,
    }
    return outcome
