"""Stage `kernel_tune`: per 2:4 Linear shape, the fastest kernel on this GPU, written as a kernel plan.

Reads the `model` artifact, finds the decoder layers' Linears whose weights follow 2:4 (a Linear
that does not is dense by definition), groups them by weight shape and, on a CUDA device, tunes each
shape with `kernels.autotune` (check against dense, then time). Writes `kernel_plan.json` (kind
`kernel_plan`) and metrics `kernel_speedup.<out>x<in>.<tokens>` and `kernel_tuned_shapes`.

Without a CUDA device nothing is timed: the plan marks every shape dense with reason "no CUDA GPU"
and the result's notes say that tuning was skipped. Sample recipe entry::

    - stage: kernel_tune
      tokens: [1, 16, 512, 2048]
      dtype: float16
      repeats: 50
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from kernels.autotune import TuneSettings, shape_key, tune
from kernels.plan import dense_plan, environment_of, plan_from_tuning, save_plan
from kernels.sparse24 import is_24, mask_from_zero_pattern
from pipelines.modeling import decoder_layers
from pipelines.modelio import load_model
from pipelines.recipe import KernelTuneStage
from pipelines.stage import Metric, StageContext, StageError, StageResult

log = logging.getLogger(__name__)

NO_GPU = "no CUDA GPU"


def find_24_linears(model: torch.nn.Module) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(shape key -> 2:4 Linear names, non-2:4 Linear name -> shape key) inside the decoder layers."""
    prefix, layers = decoder_layers(model)
    sparse: dict[str, list[str]] = defaultdict(list)
    dense: dict[str, str] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            full = f"{prefix}.{i}.{name}"
            key = shape_key(module.out_features, module.in_features)
            if is_24(module.weight):
                sparse[key].append(full)
            else:
                dense[full] = key
    return dict(sparse), dense


def run(spec: KernelTuneStage, ctx: StageContext) -> StageResult:
    model_dir = ctx.require("model")
    dtype = getattr(torch, spec.dtype)
    try:
        model = load_model(model_dir, device="cpu", dtype=dtype)
    except Exception as error:
        raise StageError(f"kernel_tune: cannot load the model at {model_dir}: {error}") from error
    ctx.progress(0, 1, "finding 2:4 Linears")
    groups, not_24 = find_24_linears(model)
    shapes = {k: (*map(int, k.split("x")), names) for k, names in groups.items()}
    summary = {
        "sparse_24_linears": sum(len(v) for v in groups.values()),
        "dense_linears": len(not_24),
        "shapes": {k: len(v) for k, v in groups.items()},
        "dtype": spec.dtype,
        "tokens": list(spec.tokens),
    }
    notes: list[str] = []
    if not groups:
        notes.append("no decoder Linear follows 2:4; every Linear stays dense")
    cuda = ctx.device.type == "cuda" and torch.cuda.is_available()
    metrics: list[Metric] = []
    if not cuda:
        notes.append(f"kernel tuning skipped: {NO_GPU} is present (device {ctx.device}); every shape is dense")
        plan = dense_plan(shapes, spec.tokens, spec.dtype, NO_GPU, environment_of(None), notes)
        metrics.append(Metric("kernel_tuned_shapes", 0.0))
    else:
        plan = _tune(model, groups, spec, ctx, dtype, notes)
        for key, shape in plan.shapes.items():
            for tokens, choice in shape.choices.items():
                if choice.speedup is not None:
                    metrics.append(Metric(f"kernel_speedup.{key}.{tokens}", float(choice.speedup)))
        metrics.append(Metric("kernel_tuned_shapes", float(len(plan.shapes))))
        summary["sparse_choices"] = {
            key: {t: c.backend for t, c in s.choices.items()} for key, s in plan.shapes.items()
        }
    summary["environment"] = plan.environment.model_dump()
    path = save_plan(plan, ctx.workdir / "kernel_plan.json")
    ctx.progress(1, 1, "kernel plan written")
    return StageResult(outputs={"kernel_plan": path}, metrics=metrics, summary=summary, notes=notes)


def _tune(model, groups, spec, ctx, dtype, notes) -> object:
    settings = TuneSettings(tokens=tuple(spec.tokens), dtype=dtype, repeats=spec.repeats)
    # one representative weight per shape: the first Linear of that shape, with its own 2:4 mask
    weights = {}
    for key, names in groups.items():
        weight = model.get_submodule(names[0]).weight.detach()
        weights[key] = (weight, mask_from_zero_pattern(weight))
    del model
    tuned = tune(weights, settings, ctx.device, progress=ctx.progress)
    env = environment_of(ctx.device)
    wins = sum(c["backend"] != "dense" for s in tuned.values() for c in s.values())
    notes.append(f"tuned {len(tuned)} shapes x {len(spec.tokens)} token counts on {env.gpu}; "
                 f"{wins} choices sparse, the rest dense")
    return plan_from_tuning(tuned, groups, list(spec.tokens), spec.dtype, env, notes)
