"""The prune stage: magnitude, Wanda or SparseGPT, unstructured or N:M, uniform or OWL, layer by layer.

Inputs: `model` (a model directory) and, for wanda/sparsegpt or the OWL profile, `calibration`
(a safetensors file with `input_ids` [samples, seq_len]; any `sq_norm.*` statistics in it are not
used, since each layer's statistics are recomputed on the outputs of the already pruned layers).
Magnitude reads no calibration, even when a calibrate stage ran before it: with a uniform profile
it runs no forward pass at all.
Outputs: `model`, `masks`, `compressed_model` (unless `export: none`) and `report`. Sample::

    - stage: prune
      method: sparsegpt
      pattern: "2:4"
      block_size: 128
      dampening: 0.01
      batch_size: 4

Everything that can be checked is checked before the first forward pass: target patterns that
match nothing, N:M groups that do not divide a Linear's input, empty calibration data.

Streaming (`streaming: true`, or `auto` when the weights at `dtype` exceed `host_memory_gb`): the
model is never loaded whole; `pipelines.pruning.streaming` reads each decoder layer from the
safetensors checkpoint and writes it back pruned, one shard per layer, with the same masks and
weights as in memory. No compressed copy is written then (it is built from the whole model).
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

from pipelines.export import choose_format, export_compressed
from pipelines.masks import save_masks
from pipelines.modeling import decoder_layers
from pipelines.modelio import declared_dtype, load_model, save_model
from pipelines.pruning.device_plan import stage_devices
from pipelines.pruning.engine import LinearOutcome, MethodConfig, prune_layer, prune_layer_without_data
from pipelines.pruning.owl import outlier_ratio, owl_sparsities
from pipelines.pruning.sequential import CalibrationError, LayerWork, run_sequential
from pipelines.pruning.streaming import StreamedModel, copy_rest, run_streaming, stream_without_data
from pipelines.pruning.targets import check_pattern_fits, resolve_targets
from pipelines.recipe import PruneStage, SparseGPTPrune
from pipelines.stage import Metric, StageContext, StageError, StageResult
from pipelines.streamio import CheckpointError, CheckpointReader, MaskSpill

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_calibration_ids(path: Path, vocab_size: int) -> torch.Tensor:
    """`input_ids` of a calibration artifact, checked: non-empty, 2-D, integer, within the vocabulary."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            ids = handle.get_tensor("input_ids") if "input_ids" in handle.keys() else None  # noqa: SIM118
    except (OSError, ValueError) as error:
        raise CalibrationError(f"calibration: cannot read {path}: {error}") from error
    if ids is None:
        raise CalibrationError(f"calibration: {path.name} has no 'input_ids' tensor")
    if ids.ndim != 2 or ids.numel() == 0:
        raise CalibrationError(f"calibration: input_ids is empty or not [samples, seq_len] (shape {tuple(ids.shape)})")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise CalibrationError(f"calibration: input_ids must be integer token ids, got {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise CalibrationError(f"calibration: token ids outside [0, {vocab_size}) for this model")
    return ids.long()


def decide_streaming(spec: PruneStage, model_dir: Path, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether to stream the model (see `PruneStage.streaming`), and why, in words for the report."""
    if spec.streaming != "auto":
        return bool(spec.streaming), f"streaming {str(spec.streaming).lower()} in the recipe"
    try:
        weights = CheckpointReader(model_dir).weight_bytes(dtype)
    except CheckpointError:
        return False, "streaming auto: no safetensors checkpoint to stream from, loaded whole"
    if spec.host_memory_gb is not None:
        allowed, source = spec.host_memory_gb * 1e9, "host_memory_gb"
    else:
        allowed, source = psutil.virtual_memory().available / 2, "half the available host memory"
    stream = weights > allowed
    return stream, (f"streaming auto: weights {weights / 1e9:.3g} GB at {str(dtype).removeprefix('torch.')} "
                    f"{'>' if stream else '<='} {allowed / 1e9:.3g} GB ({source})")


def _layer_sparsities(sequential, ids, targets, spec: PruneStage, ctx: StageContext, total: int) -> tuple[dict, int]:
    """Per decoder layer sparsity: uniform, or OWL from one dense pass (Wanda scores per layer)."""
    base = spec.target_sparsity
    if spec.profile == "uniform":
        return {index: base for index in targets}, 0
    ratios: dict[int, float] = {}

    def observe(work: LayerWork) -> None:
        names = [n for group in work.groups for n in group]
        leader = {n: group[0] for group in work.groups for n in group}
        weights = [work.linears[n].weight for n in names]
        norms = [work.stats[leader[n]].col_sq_norms for n in names]
        ratios[work.index] = float(outlier_ratio(weights, norms, spec.owl_threshold))

    peak = sequential(
        ids, targets, observe, device=ctx.device, batch_size=spec.batch_size, full_stats=False,
        propagate="dense", progress=lambda d, t, m: ctx.progress(d, total, f"OWL outliers: {m}"),
    )
    order = sorted(ratios)
    values = owl_sparsities([ratios[i] for i in order], base, spec.owl_lambda)
    return dict(zip(order, values, strict=True)), peak


def method_config(spec: PruneStage) -> MethodConfig:
    """The engine's view of a spec: the method and, for SparseGPT, its solver settings."""
    if isinstance(spec, SparseGPTPrune):
        return MethodConfig(spec.method, spec.nm, spec.block_size, spec.dampening, spec.damping_retries,
                            spec.use_act_order)
    return MethodConfig(spec.method, spec.nm)


def run(spec: PruneStage, ctx: StageContext) -> StageResult:
    """Prune the model of `ctx.inputs['model']` as `spec` says; see the module docstring."""
    start = time.perf_counter()
    model_dir = ctx.require("model")
    dtype = _DTYPES[spec.dtype]
    stream, reason = decide_streaming(spec, Path(model_dir), dtype)
    logger.info("prune: %s", reason)
    if stream and spec.export not in ("auto", "none"):
        raise StageError(f"export and streaming: {reason}, and a streamed model gets no compressed copy; "
                         f"set export 'none' or streaming false (export is {spec.export!r})")
    streamed = StreamedModel.open(model_dir, dtype) if stream else None
    model = streamed.model if streamed is not None else load_model(model_dir, "cpu", dtype)
    targets = resolve_targets(model, spec.targets, spec.ignore)
    linears = {name: lin for found in targets.values() for name, lin in found.items()}
    check_pattern_fits(linears, spec.nm)
    config = method_config(spec)
    ids = None
    if spec.needs_calibration:
        ids = read_calibration_ids(ctx.require("calibration"), model.config.vocab_size)
    torch.manual_seed(ctx.seed)

    n_layers = len(decoder_layers(model)[1])
    total = n_layers * (2 if spec.profile == "owl" else 1)
    writer = spill = None
    outcomes: list[LinearOutcome] = []

    def keep(found: list[LinearOutcome]) -> None:
        outcomes.extend(found)
        if spill is not None:
            spill.add(found)  # the packed masks go to disk layer by layer

    if streamed is not None:
        spill = MaskSpill(Path(ctx.workdir) / "masks-parts")
        writer = streamed.writer(Path(ctx.workdir) / "model", declared_dtype(model_dir) or dtype)
        copy_rest(streamed, writer)
        sequential = partial(run_streaming, streamed)
    else:
        sequential = partial(run_sequential, model)
    sparsities, peak = _layer_sparsities(sequential, ids, targets, spec, ctx, total)
    offset = total - n_layers
    if streamed is not None:
        sequential = partial(run_streaming, streamed, writer=writer)
    if config.needs_data:
        # several GPUs (resources.num_gpus > 1): samples and solves spread over them (multi_device.py)
        devices = {} if streamed is not None else {"devices": stage_devices(spec.resources.num_gpus, ctx.device)}
        if streamed is not None and spec.resources.num_gpus > 1:
            logger.warning("streaming prune: one GPU (the multi-device split is not combined with streaming)")
        peak = max(peak, sequential(
            ids, targets, lambda work: keep(prune_layer(work, config, sparsities[work.index])),
            device=ctx.device, **devices, batch_size=spec.batch_size, full_stats=config.needs_hessian,
            propagate="pruned" if spec.sequential else "dense", within_layer=spec.calibrate_within_layer,
            progress=lambda d, t, m: ctx.progress(offset + d, total, f"pruning: {m}"),
        ))
    elif streamed is not None:
        peak = stream_without_data(
            streamed, targets, lambda index, found: keep(prune_layer_without_data(found, config, sparsities[index])),
            device=ctx.device, writer=writer,
            progress=lambda d, t, m: ctx.progress(offset + d, total, f"pruning by magnitude: {m}"),
        )
    else:
        for done, (index, found) in enumerate(sorted(targets.items()), 1):
            outcomes.extend(prune_layer_without_data(found, config, sparsities[index]))
            ctx.progress(offset + done * n_layers // len(targets), total, f"pruning layer {index} by magnitude")
    prune_time = time.perf_counter() - start
    if writer is not None:
        return _write_outputs(spec, ctx, None, writer.finish(), outcomes, sparsities, prune_time, peak, reason, spill)
    return _write_outputs(spec, ctx, model, model_dir, outcomes, sparsities, prune_time, peak, reason)


def _write_outputs(spec, ctx, model, model_dir, outcomes, sparsities, prune_time, peak, streaming,
                   spill: MaskSpill | None = None) -> StageResult:
    """Masks, report and metrics; the model (unless `model` is None: streamed, already written to `model_dir`,
    its masks in `spill`) and its compressed copy."""
    workdir = Path(ctx.workdir)
    masks_meta = {"method": spec.method, "pattern": spec.pattern, "sparsity": str(spec.target_sparsity)}
    notes = []
    if model is None:
        outputs = {"model": model_dir}
        if spec.export == "auto":
            notes.append(f"export: no compressed copy ({streaming})")
    else:
        outputs = {"model": save_model(model, model_dir, workdir / "model")}
    if spill is not None:
        outputs["masks"] = spill.write(workdir / "masks.safetensors", masks_meta)
    else:
        outputs["masks"] = save_masks({o.name: o.packed_mask for o in outcomes}, {o.name: o.shape for o in outcomes},
                                      workdir / "masks.safetensors", meta=masks_meta)
    if model is not None and spec.export != "none":
        fmt = choose_format(spec.nm) if spec.export == "auto" else spec.export
        structure = "2:4" if fmt == "sparse-24-bitmask" else spec.pattern
        outputs["compressed_model"] = export_compressed(
            model, workdir / "compressed", fmt, [o.name for o in outcomes], sparsity_structure=structure,
            tokenizer_source=model_dir,
        )
    asked = spec.dampening if isinstance(spec, SparseGPTPrune) else None
    for o in outcomes:
        if asked is not None and o.damping is not None and o.damping > asked * 1.0001:
            notes.append(f"sparsegpt: {o.name} needed damping {o.damping:g} (asked {asked:g})")
    params = sum(o.shape[0] * o.shape[1] for o in outcomes)
    overall = sum(o.sparsity * o.shape[0] * o.shape[1] for o in outcomes) / max(params, 1)
    metrics = [Metric("sparsity", overall), Metric("prune_time_s", prune_time), Metric("peak_gpu_mem_bytes", peak)]
    for o in outcomes:
        metrics.append(Metric(f"sparsity.{o.name}", o.sparsity))
        metrics.append(Metric(f"time_s.{o.name}", o.time_s))
        if o.recon_error is not None:
            metrics.append(Metric(f"recon_error.{o.name}", o.recon_error))
        if o.damping is not None:
            metrics.append(Metric(f"damping.{o.name}", o.damping))
    summary = {
        "method": spec.method,
        "pattern": spec.pattern,
        "profile": spec.profile,
        "target_sparsity": spec.target_sparsity,
        "sparsity": overall,
        "pruned_linears": len(outcomes),
        "pruned_params": params,
        "layer_sparsity": {str(k): v for k, v in sorted(sparsities.items())},
        "prune_time_s": prune_time,
        "peak_gpu_mem_bytes": peak,
        "device": str(ctx.device),
        "streaming": model is None,
        "streaming_reason": streaming,
        "linears": {
            o.name: {"shape": list(o.shape), "target_sparsity": o.target_sparsity, "sparsity": o.sparsity,
                     "recon_error": o.recon_error, "time_s": o.time_s, "damping": o.damping}
            for o in outcomes
        },
        "notes": notes,
    }
    report = workdir / "prune_report.json"
    report.write_text(json.dumps(summary, indent=2))
    outputs["report"] = report
    headline = {k: v for k, v in summary.items() if k != "linears"}
    return StageResult(outputs=outputs, metrics=metrics, summary=headline, notes=notes)
