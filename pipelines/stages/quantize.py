"""Quantize: FP8 E4M3 weights (per output channel) and activations (per token, or static per tensor).

Inputs: `model` (a model folder, usually pruned and fine-tuned) and, with `activations: static` or
`weight_rounding: gptq`, `calibration` (its `input_ids`; each target Linear's max |input| over them fixes
its static input scale, observed on the model as given, before its weights are rounded; GPTQ measures
each layer's Hessian on them, layer by layer, `pipelines.quantize.gptq`). Outputs:

- `model`: a plain `save_pretrained` folder whose target weights are the dequantized FP8 weights (code *
  scale, in the input's stored dtype) plus `fp8_scales.safetensors`, the sidecar with every scale and
  the scheme (`pipelines.quantize.sidecar`); later stages load it as any model, and
  `pipelines.quantize.read_fp8_layers` / `fp8_codes` give back the exact codes and scales.
- `compressed_model` (unless `export: none`): compressed-tensors' `float-quantized` layout with the
  quantization config (FP8_DYNAMIC) and the sparsity config, or with `export: sparse-24-bitmask` the
  codes packed 2:4 (`pipelines.quantize.export`).
- `report`: `quantize_report.json`, per Linear: zeros before/after, relative weight error, scales.

Checked before anything is written: every weight that was exactly zero is still zero (the 2:4 pattern
survives), and the codes come back exactly from the weights in the stored dtype. Metrics:
`zeros_preserved` (1.0), `sparsity_before`, `sparsity_after` (over the quantized Linears: a weight
below half the smallest E4M3 step of its row becomes zero, so it can only rise), `weight_rel_error`
(||W_fp8 - W|| / ||W|| over all of them), `weight_rel_error_max`, and `weight_rel_error.<linear>`. Sample::

    - stage: quantize
      scheme: fp8_dynamic
      activations: dynamic
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

from pipelines.export import ExportError
from pipelines.modelio import declared_dtype, load_model, save_model
from pipelines.pruning.targets import PruneConfigError, resolve_targets
from pipelines.quantize.apply import gptq_quantize, observe_input_amax, quantize_linears
from pipelines.quantize.export import export_fp8_compressed
from pipelines.quantize.sidecar import Fp8Layer, is_fp8_model, write_fp8_layers
from pipelines.recipe import QuantizeStage
from pipelines.stage import Metric, StageContext, StageError, StageResult
from pipelines.stages.calibrate import read_calibration

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
COMPRESSED_DIR = "compressed"
REPORT_FILE = "quantize_report.json"


def run(spec: QuantizeStage, ctx: StageContext) -> StageResult:
    """Quantize the model of `ctx.inputs['model']` as `spec` says; see the module docstring."""
    start = time.perf_counter()
    model_dir = ctx.require("model")
    if is_fp8_model(model_dir):
        raise StageError("quantize: the input model is already FP8 (it has an fp8_scales.safetensors); quantize once")
    storage = declared_dtype(model_dir)
    # gptq runs layer by layer through the prune stage's driver, which moves one layer at a time to the device
    model = load_model(model_dir, device="cpu" if spec.weight_rounding == "gptq" else ctx.device)
    storage = storage or next(model.parameters()).dtype
    try:
        found = resolve_targets(model, spec.targets, spec.ignore)
    except PruneConfigError as error:  # its messages name `targets` / `ignore`, as they should here
        raise StageError(f"quantize: {error}") from error
    linears = {name: lin for layer in found.values() for name, lin in layer.items()}
    amax, scales, originals = None, None, None
    if spec.needs_calibration:
        ids = read_calibration(ctx.require("calibration")).input_ids
        if ids.numel() == 0:
            raise StageError("quantize: the calibration artifact holds no tokens")
    if spec.activations == "static":
        amax = observe_input_amax(model, linears, ids, spec.batch_size, ctx.progress)
    if spec.weight_rounding == "gptq":
        originals = {name: linear.weight.detach().cpu().clone() for name, linear in linears.items()}
        scales = gptq_quantize(model, found, ids, storage, device=ctx.device, batch_size=spec.batch_size,
                               block_size=spec.block_size, dampening=spec.dampening, act_order=spec.act_order,
                               progress=ctx.progress)
    layers, outcomes = quantize_linears(linears, storage, spec.activations, amax, scales=scales, originals=originals)
    layers = {name: _cpu(layer) for name, layer in layers.items()}
    broken = [o.name for o in outcomes if not o.zeros_preserved]
    if broken:
        raise StageError(f"quantize: pruned zeros became nonzero in {broken[:3]}: the FP8 mapping is wrong")
    lossy = [o.name for o in outcomes if not o.codes_recoverable]
    if lossy:
        raise StageError(f"quantize: the FP8 codes of {lossy[:3]} do not survive storage in {storage}; "
                         "store the model in float32 or bfloat16")

    model = model.cpu()
    out = save_model(model, model_dir, Path(ctx.workdir) / MODEL_DIR)
    write_fp8_layers(out, layers, spec.scheme)
    outputs = {"model": out}
    if spec.export != "none":
        try:
            outputs["compressed_model"] = export_fp8_compressed(
                model, Path(ctx.workdir) / COMPRESSED_DIR, layers, storage, tokenizer_source=model_dir,
                fmt=spec.export,
            )
        except ExportError as error:
            raise StageError(f"quantize: export {spec.export!r}: {error}") from error
    seconds = time.perf_counter() - start
    return _result(spec, ctx, outputs, layers, outcomes, amax, storage, seconds)


def _cpu(layer: Fp8Layer) -> Fp8Layer:
    return replace(layer, weight_scale=layer.weight_scale.cpu(),
                   input_scale=None if layer.input_scale is None else layer.input_scale.cpu())


def _result(spec, ctx, outputs, layers, outcomes, amax, storage, seconds) -> StageResult:
    numel = sum(o.numel for o in outcomes)
    before = sum(o.zeros_before for o in outcomes) / numel
    after = sum(o.zeros_after for o in outcomes) / numel
    # ||dW||^2 summed over layers needs each ||W||^2, which rel_error alone loses: weight by numel instead
    mean_error = math.fsum(o.rel_error * o.numel for o in outcomes) / numel
    metrics = [
        Metric("zeros_preserved", 1.0),
        Metric("sparsity_before", before),
        Metric("sparsity_after", after),
        Metric("weight_rel_error", mean_error),
        Metric("weight_rel_error_max", max(o.rel_error for o in outcomes)),
        Metric("quantized_linears", float(len(outcomes))),
        Metric("quantize_time_s", seconds),
    ]
    metrics += [Metric(f"weight_rel_error.{o.name}", o.rel_error) for o in outcomes]
    summary = {
        "scheme": spec.scheme, "activations": spec.activations, "weight_rounding": spec.weight_rounding,
        "quantized_linears": len(outcomes),
        "zeros_preserved": True, "sparsity_before": before, "sparsity_after": after,
        "weight_rel_error": mean_error, "stored_dtype": str(storage).removeprefix("torch."),
        "quantize_time_s": seconds,
    }
    report = {
        **summary,
        "linears": {
            o.name: {"numel": o.numel, "zeros_before": o.zeros_before, "zeros_after": o.zeros_after,
                     "rel_error": o.rel_error, "max_abs_error": o.max_abs_error,
                     "weight_scale_max": float(layers[o.name].weight_scale.max()),
                     "input_amax": None if amax is None else amax[o.name]}
            for o in outcomes
        },
    }
    path = Path(ctx.workdir) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2))
    notes = [f"quantize: {spec.scheme}, {spec.activations} activations, {spec.weight_rounding} weight rounding, "
             f"{len(outcomes)} Linears; "
             f"pruned zeros preserved (sparsity {before:.4f} -> {after:.4f})"]
    logger.info("%s; weight rel. error %.4g", notes[0], mean_error)
    return StageResult(outputs={**outputs, "report": path}, metrics=metrics, summary=summary, notes=notes)
