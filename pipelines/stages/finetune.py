"""Finetune: masked training that keeps pruned weights exactly zero, optionally distilling the dense model.

Masks are `weight == 0` of every decoder-layer Linear, captured before training; masked gradients are
zeroed before and masked weights re-zeroed after every optimizer step. Data: random windows of the
calibration split, drawn per step from a seed derived from (job seed, step), so a run is reproducible.
Loss: `alpha_ce * CE + beta_kd * T^2 * KL(teacher || student)`, the teacher being the job's dense
`base_model` (only loaded when `beta_kd > 0`). AdamW, linear warmup then cosine decay to zero.
Output (kind `model`): `model/`. Recipe sample::

    - stage: finetune
      steps: 20
      lr: 2.0e-5
      batch_size: 4
      seq_len: 256
      beta_kd: 1.0        # 0 turns distillation off
      temperature: 2.0
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
    teacher = load_model(ctx.require("base_model"), device=ctx.device) if spec.beta_kd > 0 else None
    outcome = train(model, teacher, spec, ctx)
    save_model(model, model_dir, out)
    logger.info("fine-tuned %d steps, final loss %.4f -> %s", spec.steps, outcome.summary["final_loss"], out)
    return StageResult(outputs={"model": out, **outcome.outputs}, metrics=outcome.metrics,
                       summary=outcome.summary, notes=outcome.notes)
