"""Quantize a model's Linears to FP8 in place, and observe static input scales on calibration tokens.

`quantize_linears` replaces each target weight by its dequantized FP8 value (fp32 in memory, on the grid)
and returns the `Fp8Layer` of each plus what changed: exact zeros before and after (a zero stays zero; a
tiny nonzero whose |w| / scale is below half the smallest E4M3 subnormal becomes zero), the relative
weight error, and whether the stored dtype keeps the codes recoverable (`fp8_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipelines.quantize.fp8 import (
    dequantize_weight,
    fp8_codes,
    quantization_error,
    quantize_weight,
    tensor_scale,
    weight_scales,
)
from pipelines.quantize.gptq import gptq_fp8
from pipelines.quantize.sidecar import Fp8Layer


@dataclass(frozen=True)
class LinearQuantOutcome:
    """What quantizing one Linear did."""

    name: str
    numel: int
    zeros_before: int
    zeros_after: int
    zeros_preserved: bool
    """Every weight that was exactly zero is still exactly zero."""
    codes_recoverable: bool
    """The codes come back exactly from the weight stored in the model's dtype."""
    rel_error: float
    max_abs_error: float


def quantize_linears(
    linears: dict[str, nn.Linear], storage_dtype: torch.dtype, activations: str = "dynamic",
    input_amax: dict[str, float] | None = None, *, scales: dict[str, Tensor] | None = None,
    originals: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Fp8Layer], list[LinearQuantOutcome]]:
    """Quantize each Linear's weight in place to the FP8 grid; scales are rounded to `storage_dtype`.

    With activations 'static', `input_amax` holds each Linear's observed max |input| (see `observe_input_amax`).
    `scales` (per Linear) are used instead of max|w| / 448: weights that GPTQ already put on a grid keep it.
    `originals` are the weights before that, against which zeros and errors are checked (default: the
    weights as they are).
    """
    if activations == "static" and (input_amax is None or set(linears) - set(input_amax)):
        missing = sorted(set(linears) - set(input_amax or {}))
        raise ValueError(f"activations 'static' needs an observed input max for every Linear; missing {missing[:3]}")
    layers: dict[str, Fp8Layer] = {}
    outcomes: list[LinearQuantOutcome] = []
    for name, linear in linears.items():
        current = linear.weight.detach()
        weight = current if originals is None else originals[name].to(current.device)
        scale = weight_scales(weight, storage_dtype) if scales is None else scales[name].to(current.device)
        codes = quantize_weight(current, scale)
        dequantized = dequantize_weight(codes, scale, torch.float32)
        stored = dequantized.to(storage_dtype)
        was_zero = weight == 0
        error = quantization_error(weight, dequantized)
        outcomes.append(LinearQuantOutcome(
            name=name, numel=weight.numel(), zeros_before=int(was_zero.sum()), zeros_after=int((stored == 0).sum()),
            zeros_preserved=bool((stored[was_zero] == 0).all()),
            codes_recoverable=bool(torch.equal(fp8_codes(stored, scale).view(torch.uint8), codes.view(torch.uint8))),
            rel_error=error["rel_error"], max_abs_error=error["max_abs_error"],
        ))
        with torch.no_grad():
            linear.weight.copy_(stored.to(linear.weight.dtype))
        input_scale = None if activations == "dynamic" else tensor_scale(input_amax[name], storage_dtype)
        layers[name] = Fp8Layer(weight_scale=scale, input_scale=input_scale, activations=activations)
    return layers, outcomes


@torch.inference_mode()
def observe_input_amax(
    model: nn.Module, linears: dict[str, nn.Linear], input_ids: Tensor, batch_size: int, progress=None,
) -> dict[str, float]:
    """Max |input| of each Linear over all calibration tokens (the decoder only; the LM head is not run)."""
    device = next(model.parameters()).device
    amax = dict.fromkeys(linears, 0.0)

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))

        return hook

    handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
    try:
        batches = (input_ids.shape[0] + batch_size - 1) // batch_size
        for b in range(batches):
            model.base_model(input_ids=input_ids[b * batch_size:(b + 1) * batch_size].to(device), use_cache=False)
            if progress is not None:
                progress(b + 1, batches, f"input scales: batch {b + 1}/{batches}")
    finally:
        for handle in handles:
            handle.remove()
    return amax


def gptq_quantize(
    model: nn.Module, targets: dict[int, dict[str, nn.Linear]], input_ids: Tensor, storage_dtype: torch.dtype, *,
    device: torch.device, batch_size: int, block_size: int, dampening: float, act_order: bool = True, progress=None,
) -> dict[str, Tensor]:
    """Round every target weight to FP8 with `gptq_fp8`, layer by layer on the calibration tokens (each layer
    sees the outputs of the layers already rounded, o_proj/down_proj those of the rounded q/k/v, gate/up).
    Returns the per-row scales (CPU) to hand to `quantize_linears`."""
    from pipelines.pruning.sequential import LayerWork, run_sequential  # noqa: PLC0415 (the driver is heavy)

    scales: dict[str, Tensor] = {}

    def on_layer(work: LayerWork) -> None:
        for group in work.groups:
            hessian = work.stats[group[0]].hessian()
            for name in group:
                linear = work.linears[name]
                scale = weight_scales(linear.weight, storage_dtype)
                rounded, _ = gptq_fp8(linear.weight, hessian, scale, block_size=block_size, dampening=dampening,
                                      act_order=act_order)
                with torch.no_grad():
                    linear.weight.copy_(rounded.to(linear.weight.dtype))
                scales[name] = scale.cpu()

    run_sequential(model, input_ids, targets, on_layer, device=device, batch_size=batch_size, full_stats=True,
                   propagate="pruned", within_layer=True, progress=progress)
    return scales
