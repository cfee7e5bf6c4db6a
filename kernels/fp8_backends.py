"""FP8 Linear backends: the layer's weight is FP8 E4M3 with per-output-channel scales (the quantize stage made
it so), activations are quantized per token at run time, the output is bf16.

- `dense-fp8`: cuBLASLt through `torch._scaled_mm` (row-wise scales), after the fused per-token quantization
  of `kernels.fp8.quantize_rows`.
- `cutlass-sm90-fp8`: our own FP8 2:4 GEMM (`kernels.cutlass24`, e4m3 sparse wgmma), both scales applied in
  its epilogue; tiles and schedules per token count as for the 16-bit `cutlass-sm90`.

Both take the layer's dequantized weight (what the quantize stage stores: codes times scales, in the model's dtype)
and its scales (`kernels.fp8.Fp8Scales`, or just the fp32 weight scale [out] for dynamic activations); `prepare`
recovers the exact codes. A layer with a static activation scale quantizes every token with it. They are candidates
only for layers that were quantized: a plain bf16 layer never runs in FP8 (the tuner and `apply_plan` see to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kernels.backends import Backend, BackendError, CutlassSm90Backend, Handle
from kernels.fp8 import FP8, Fp8Scales, quantize_rows, quantize_with_scales


def fp8_codes(weight: Tensor, scales: Tensor | Fp8Scales | None) -> tuple[Tensor, Tensor]:
    """(e4m3 codes, fp32 weight scales) of a dequantized FP8 weight; `scales` None is a caller error."""
    if scales is None:
        raise BackendError("FP8 backends need the layer's per-channel weight scales (was the layer quantized?)")
    scale = Fp8Scales.of(scales).weight.detach().to(device=weight.device, dtype=torch.float32).reshape(-1)
    if scale.numel() != weight.shape[0]:
        raise BackendError(f"weight scale has {scale.numel()} entries for {weight.shape[0]} output channels")
    return quantize_with_scales(weight.detach(), scale), scale


def _input_scale(scales: Tensor | Fp8Scales, device: torch.device) -> Tensor | None:
    """The static activation scale on `device` (fp32 scalar), or None for dynamic per-token scales."""
    static = Fp8Scales.of(scales).input
    return None if static is None else static.detach().to(device=device, dtype=torch.float32).reshape(())


def _fp8_gemm_device(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return False, f"FP8 tensor cores need sm89+, device is sm{major}{minor}"
    return True, ""


class DenseFp8Backend(Backend):
    name = "dense-fp8"
    sparse = False
    fp8 = True

    def available(self, device: torch.device) -> tuple[bool, str]:
        return _fp8_gemm_device(device)

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None,
                scale: Tensor | Fp8Scales | None = None) -> Handle:
        codes, w_scale = fp8_codes(self._masked(weight, mask), scale)
        # _scaled_mm wants the second operand column-major: the transpose of a row-major [out, in] is
        return self._handle(weight, (codes, w_scale.view(1, -1), _input_scale(scale, weight.device)))

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        codes, scale, input_scale = handle.data
        x2d = x.reshape(-1, handle.in_features)
        xq, xs = quantize_rows(x2d, input_scale)
        y = torch._scaled_mm(xq, codes.t(), scale_a=xs.view(-1, 1), scale_b=scale, out_dtype=torch.bfloat16)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], handle.out_features)


@dataclass
class _CompressedFp8Weight:
    values: Tensor
    meta: Tensor
    scale: Tensor
    input_scale: Tensor | None
    lib: Any
    routes: dict[int, tuple[int, Any]] = field(default_factory=dict)


class CutlassSm90Fp8Backend(CutlassSm90Backend):
    """Our sm90a FP8 2:4 GEMM: the 16-bit backend's availability, tile table, default configs, candidate
    configs and per-token-count routes, on e4m3 codes compressed once."""

    name = "cutlass-sm90-fp8"
    fp8 = True

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None,
                scale: Tensor | Fp8Scales | None = None) -> Handle:
        if weight.device.type != "cuda":
            raise BackendError(f"{self.name} needs a CUDA weight")
        codes, w_scale = fp8_codes(self._masked(weight, mask), scale)
        lib = self._lib(weight.device)
        values, meta = lib.compress(codes.contiguous())
        data = _CompressedFp8Weight(values, meta, w_scale.contiguous(), _input_scale(scale, weight.device), lib)
        return self._handle(weight, data, configs)

    def linear(self, x: Tensor, handle: Handle, config: dict[str, int] | None = None) -> Tensor:
        weight: _CompressedFp8Weight = handle.data
        x2d = x.reshape(-1, handle.in_features)
        kernel, schedule = self._kernel_schedule(handle, x2d.shape[0], config)
        xq, xs = quantize_rows(x2d, weight.input_scale)
        y = weight.lib.linear_fp8(xq, xs, weight.values, weight.meta, weight.scale, handle.out_features, kernel,
                                  schedule)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], handle.out_features)


FP8_BACKENDS: dict[str, type[Backend]] = {
    DenseFp8Backend.name: DenseFp8Backend,
    CutlassSm90Fp8Backend.name: CutlassSm90Fp8Backend,
}



def use_fp8_gemms(model: torch.nn.Module, scales: dict[str, Tensor | Fp8Scales]) -> int:
    """Run the named quantized Linears of `model` through real FP8 GEMMs (`dense-fp8`), in place.

    For measuring a quantized model as it would be served (the evaluate stage on a GPU), without a kernel
    plan; the model must be bf16 on an FP8-capable GPU. Returns how many Linears were swapped."""
    from kernels.plan import KernelChoice, SparseLinear

    backend = DenseFp8Backend()
    choice = {1: KernelChoice(backend=backend.name, reason="FP8 execution of a quantized layer")}
    swapped = 0
    for name, scale in scales.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise BackendError(f"{name} is a {type(linear).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear(linear, None, choice, {backend.name: backend}, scale))
        swapped += 1
    return swapped


__all__ = ["FP8", "FP8_BACKENDS", "CutlassSm90Fp8Backend", "DenseFp8Backend", "Fp8Scales", "fp8_codes", "use_fp8_gemms"]
