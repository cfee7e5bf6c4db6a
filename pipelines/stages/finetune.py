"""Finetune: masked training that keeps pruned weights exactly zero, optionally distilling the dense model.

Masks are `weight == 0` of every decoder-layer Linear, captured before training; masked gradients are
zeroed before and masked weights re-zeroed after every optimizer step. Data: random windows of the
calibration split, drawn per step from a seed derived from (job seed, step), so a run is reproducible.
Loss: `alpha_ce * CE + beta_kd * T^2 * KL(teacher || student) + gamma_hidden * hidden-state MSE`, the
teacher being the job's dense `base_model` (loaded only when needed; with `teacher_cache` its logits
are stored on disk once per model and data, see `pipelines.finetune.teacher`). AdamW, linear warmup
then cosine decay to zero, global-norm clipping. Options: bf16 autocast (`precision`, on by default
on CUDA), gradient checkpointing, LoRA on the kept weights only (`lora_rank`, merged at the end).

Outputs: `model/` (kind `model`); with `checkpoint_every: N`, `checkpoint/` (kind `checkpoint`),
rewritten every N steps. Given a `checkpoint` input, the stage resumes from it and returns the whole
metric series. Recipe sample::

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

from pipelines.finetune.loop import train
from pipelines.modelio import load_model, save_model
from pipelines.recipe import FinetuneStage
from pipelines.stage import StageContext, StageResult

logger = logging.getLogger(__name__)

MODEL_DIR = "model"


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
    logger.info("fine-tuned %d steps, final loss %s -> %s", spec.steps, outcome.summary["final_loss"], out)
    return StageResult(outputs={"model": out, **outcome.outputs}, metrics=outcome.metrics,
                       summary=outcome.summary, notes=outcome.notes)
