"""Finetune: masked training that keeps pruned weights exactly zero, optionally distilling the dense model.

Masks are `weight == 0` of every decoder-layer Linear, captured before training; masked gradients are
zeroed before and masked weights re-zeroed after every optimizer step. Data: random windows of the
calibration split, drawn per step from a seed derived from (job seed, step), so a run is reproducible.
Loss: `alpha_ce * CE + beta_kd * T^2 * KL(teacher || student) + gamma_hidden * hidden-state MSE`, the
teacher being the job's dense `base_model` (loaded only when needed; with `teacher_cache` its logits
are stored on disk once per model and data, see `pipelines.finetune.teacher`). AdamW, linear warmup
then cosine decay to zero, global-norm clipping. Options: bf16 autocast (`precision`, on by default
on CUDA), gradient checkpointing, LoRA on the kept weights only (`lora_rank`, merged at the end).

Outputs: `model/` (kind `model`), in the input model's stored dtype; `compressed/` (kind
`compressed_model`) when the input model is sparse, so a job's latest compressed export is of its
final model: the same format and Linears as the job's earlier `compressed_model` input when there is
one (prune's choice), else judged from the zeros (`pipelines.export.infer_export`: 2:4 when every pruned
Linear is 2:4); none when the job pruned with `export: none` (a `masks` input without a
`compressed_model`). With `checkpoint_every: N`, `checkpoint/` (kind `checkpoint`), rewritten every N
steps. Given a `checkpoint` input, the stage resumes from it and returns the whole metric series. Recipe sample::

    - stage: finetune
      steps: 20
      lr: 2.0e-5
      batch_size: 4
      seq_len: 256
      beta_kd: 1.0        # 0 turns distillation off
      temperature: 2.0
      teacher_topk: 64    # distil from the teacher's top-64 logits (0: all)
      teacher_cache: true
      checkpoint_every: 10
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from pipelines.export import export_compressed, infer_export, read_sparsity_config
from pipelines.finetune.loop import train
from pipelines.modelio import load_model, save_model
from pipelines.recipe import FinetuneStage
from pipelines.stage import StageContext, StageResult

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
COMPRESSED_DIR = "compressed"


def export_plan(model: nn.Module, ctx: StageContext) -> tuple[str, list[str], str] | None:
    """(format, Linears, sparsity structure) of the compressed copy to write, or None for none."""
    earlier = ctx.inputs.get("compressed_model")
    if earlier is not None:
        config = read_sparsity_config(earlier)
        return config.format, list(config.targets), config.sparsity_structure
    if "masks" in ctx.inputs:  # pruned in this job with `export: none`
        return None
    return infer_export(model)


def write_compressed(model: nn.Module, model_dir: Path, ctx: StageContext) -> dict[str, Path]:
    """`{"compressed_model": path}` when the model is to be exported compressed, else `{}`."""
    plan = export_plan(model, ctx)
    if plan is None:
        return {}
    fmt, modules, structure = plan
    out = export_compressed(model, ctx.workdir / COMPRESSED_DIR, fmt, modules, sparsity_structure=structure,
                            tokenizer_source=model_dir)
    return {"compressed_model": out}


def run(spec: FinetuneStage, ctx: StageContext) -> StageResult:
    model_dir = ctx.require("model")
    out = ctx.workdir / MODEL_DIR
    if spec.steps == 0:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(model_dir, out)
        return StageResult(outputs={"model": out}, summary={"steps": 0}, notes=["finetune: steps=0, model copied"])

    model = load_model(model_dir, device=ctx.device)
    outcome = train(model, spec, ctx)
    save_model(model, model_dir, out)
    compressed = write_compressed(model.cpu(), model_dir, ctx)
    logger.info("fine-tuned %d steps, final loss %s -> %s", spec.steps, outcome.summary["final_loss"], out)
    return StageResult(outputs={"model": out, **compressed, **outcome.outputs}, metrics=outcome.metrics,
                       summary=outcome.summary, notes=outcome.notes)
