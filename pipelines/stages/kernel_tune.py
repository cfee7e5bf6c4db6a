"""Stage `kernel_tune`: per 2:4 Linear shape, the fastest kernel on this GPU, written as a kernel plan.

Reads the `model` artifact, finds the decoder layers' Linears whose weights follow 2:4 (a Linear
that does not is dense by definition), groups them by weight shape and, on a CUDA device, tunes each
shape with `kernels.autotune` (check against dense, then time). Writes `kernel_plan.json` (kind
`kernel_plan`) and metrics `kernel_speedup.<out>x<in>.<tokens>`, `kernel_tuned_shapes` (timed in this
run) and `kernel_cached_shapes` (reused).

An optional `kernel_cache` input (written by the orchestrator from the lineage store; format
`KernelCache` below) holds choices measured earlier. A shape whose every requested token count is
cached for this environment (GPU, capability, CUDA, driver, torch, cuSPARSELt) and dtype reuses
those choices without timing; the other shapes are tuned. The plan is complete either way.

A model quantized to FP8 by the `quantize` stage (`pipelines.quantize`) is tuned with its layers' FP8
weight scales: its quantized Linears get plan keys `<out>x<in>:fp8`, whose candidates also include the
FP8 kernels (dense FP8 and our FP8 2:4), and quantized Linears that are not 2:4 are tuned too, under
`<out>x<in>:fp8-dense`, between dense bf16 and dense FP8. FP8 kernels output bfloat16, so such a
model is tuned in `dtype: bfloat16`.

Without a CUDA device nothing is timed: the plan marks every shape dense with reason "no CUDA GPU"
and the result's notes say that tuning was skipped. Sample recipe entry::

    - stage: kernel_tune
      tokens: [1, 16, 512, 2048]
      dtype: float16
      repeats: 50
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernels.autotune import TuneSettings, TuneTarget, shape_key, tune
from kernels.fp8 import Fp8Scales
from kernels.plan import Environment, KernelChoice, KernelPlan, dense_plan, environment_of, plan_from_tuning, save_plan
from kernels.sparse24 import is_24, mask_from_zero_pattern
from pipelines.modeling import decoder_layers
from pipelines.modelio import load_model
from pipelines.recipe import KernelTuneStage
from pipelines.stage import Metric, StageContext, StageError, StageInputError, StageResult

log = logging.getLogger(__name__)

NO_GPU = "no CUDA GPU"
CACHE_FORMAT = "sparseflow.kernel_cache"


class KernelCacheEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: Environment
    dtype: Literal["float16", "bfloat16"]
    shape: str = Field(pattern=r"^[0-9]+x[0-9]+(:fp8|:fp8-dense)?$",
                       description='Weight shape "<out>x<in>[:fp8|:fp8-dense]".')
    tokens: int = Field(ge=1)
    choice: KernelChoice


class KernelCache(BaseModel):
    """The `kernel_cache` input: choices measured by earlier runs, any environment."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sparseflow.kernel_cache"] = CACHE_FORMAT
    version: Literal[1] = 1
    entries: list[KernelCacheEntry] = Field(default_factory=list)


def load_kernel_cache(path: Path) -> KernelCache:
    try:
        return KernelCache.model_validate(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise StageInputError(f"kernel_cache {path}: cannot read: {error}") from error
    except ValidationError as error:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise StageInputError(f"kernel_cache {path}: invalid: {fields}") from error


def cached_choices(cache: KernelCache, environment: Environment, dtype: str, shapes: list[str],
                   tokens: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """shape -> tokens -> choice dump, for the shapes whose every token count is cached here."""
    found = {(e.shape, e.tokens): e.choice for e in cache.entries if e.environment == environment and e.dtype == dtype}
    return {key: {t: found[key, t].model_dump(mode="json") for t in tokens}
            for key in shapes if all((key, t) in found for t in tokens)}


def find_24_linears(model: torch.nn.Module, fp8_layers: frozenset[str] = frozenset()
                    ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(shape key -> tunable Linear names, untuned Linear name -> shape key) inside the decoder layers.

    Tunable: a 2:4 Linear, or any Linear named in `fp8_layers` (quantized; its key ends in `:fp8`, or in
    `:fp8-dense` when it is not 2:4), so every Linear of one key has the same structure."""
    prefix, layers = decoder_layers(model)
    sparse: dict[str, list[str]] = defaultdict(list)
    dense: dict[str, str] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            full = f"{prefix}.{i}.{name}"
            sparse_24 = is_24(module.weight)
            key = shape_key(module.out_features, module.in_features, fp8=full in fp8_layers, sparse=sparse_24)
            if sparse_24 or full in fp8_layers:
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
    fp8_scales = _fp8_scales(model_dir)
    groups, not_24 = find_24_linears(model, frozenset(fp8_scales))
    shapes = {k: (*map(int, k.partition(":")[0].split("x")), names) for k, names in groups.items()}
    summary = {
        "sparse_24_linears": sum(len(v) for v in groups.values()),
        "dense_linears": len(not_24),
        "shapes": {k: len(v) for k, v in groups.items()},
        "fp8_linears": len(fp8_scales),
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
        metrics += [Metric("kernel_tuned_shapes", 0.0), Metric("kernel_cached_shapes", 0.0)]
    else:
        cache = load_kernel_cache(ctx.inputs["kernel_cache"]) if "kernel_cache" in ctx.inputs else KernelCache()
        plan, reused = _tune(model, groups, spec, ctx, dtype, cache, notes, fp8_scales)
        for key, shape in plan.shapes.items():
            for tokens, choice in shape.choices.items():
                if choice.speedup is not None:
                    metrics.append(Metric(f"kernel_speedup.{key}.{tokens}", float(choice.speedup)))
        metrics += [Metric("kernel_tuned_shapes", float(len(plan.shapes) - reused)),
                    Metric("kernel_cached_shapes", float(reused))]
        summary["cached_shapes"] = reused
        summary["sparse_choices"] = {
            key: {t: c.backend for t, c in s.choices.items()} for key, s in plan.shapes.items()
        }
    summary["environment"] = plan.environment.model_dump()
    path = save_plan(plan, ctx.workdir / "kernel_plan.json")
    ctx.progress(1, 1, "kernel plan written")
    return StageResult(outputs={"kernel_plan": path}, metrics=metrics, summary=summary, notes=notes)


def _fp8_scales(model_dir: Path) -> dict[str, Fp8Scales]:
    """Module name -> FP8 scales of every layer the quantize stage quantized ({} for other models)."""
    from pipelines.quantize import is_fp8_model, read_fp8_layers

    if not is_fp8_model(model_dir):
        return {}
    layers = read_fp8_layers(model_dir)
    return {name: Fp8Scales(layer.weight_scale, layer.input_scale) for name, layer in layers.items()}


def _tune(model, groups, spec, ctx, dtype, cache: KernelCache, notes: list[str],
          fp8_scales: dict[str, Fp8Scales]) -> tuple[KernelPlan, int]:
    """(the plan, how many shapes came from `cache`)."""
    env = environment_of(ctx.device)
    tokens = list(spec.tokens)
    reused = cached_choices(cache, env, spec.dtype, list(groups), tokens)
    if reused:
        notes.append(f"reused {len(reused)} cached shape(s) measured earlier on {env.gpu}: {', '.join(reused)}")
    # one representative weight per shape: the first Linear of that shape, with its own 2:4 mask
    weights = {}
    for key, names in groups.items():
        if key not in reused:
            weight = model.get_submodule(names[0]).weight.detach()
            sparse = is_24(weight)
            weights[key] = TuneTarget(weight, mask_from_zero_pattern(weight) if sparse else None,
                                      fp8_scales.get(names[0]), sparse)
    del model
    settings = TuneSettings(tokens=tuple(tokens), dtype=dtype, repeats=spec.repeats)
    tuned = tune(weights, settings, ctx.device, progress=ctx.progress) if weights else {}
    wins = sum(c["backend"] != "dense" for s in tuned.values() for c in s.values())
    if weights:
        notes.append(f"tuned {len(tuned)} shapes x {len(tokens)} token counts on {env.gpu}; "
                     f"{wins} choices sparse, the rest dense")
    merged = {key: reused[key] if key in reused else tuned[key] for key in groups}
    return plan_from_tuning(merged, groups, tokens, spec.dtype, env, notes), len(reused)
