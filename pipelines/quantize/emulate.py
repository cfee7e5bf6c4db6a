"""CPU emulation of FP8 Linears: the model computes what an FP8 GEMM would, in fp32 on any device.

`attach_emulation` swaps each quantized `nn.Linear` for an `Fp8EmulatedLinear` holding the same
`weight` and `bias` parameters (state-dict names unchanged, so saving still works) plus the upcast
E4M3 codes and scales. Its forward quantizes the input (per token, or with the static scale), multiplies
codes in fp32 and applies both scales (`pipelines.quantize.fp8.fp8_linear_reference`): the numbers a
real FP8 kernel with fp32 accumulation produces, up to the order of the additions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipelines.quantize.fp8 import fp8_codes, fp8_linear_reference
from pipelines.quantize.sidecar import Fp8Layer


class Fp8EmulatedLinear(nn.Module):
    """An `nn.Linear` run as FP8 W8A8: per-channel weight scales, per-token (or static) input scales."""

    def __init__(self, linear: nn.Linear, layer: Fp8Layer) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.activations = layer.activations
        device = linear.weight.device
        scale = layer.weight_scale.float().reshape(-1).to(device)
        if scale.numel() != self.out_features:
            raise ValueError(f"weight_scale has {scale.numel()} entries for {self.out_features} output channels")
        # codes upcast once: every E4M3 value is exact in fp32, and the fp32 matmul needs them upcast anyway
        self.register_buffer("weight_codes", fp8_codes(linear.weight.detach(), scale).float(), persistent=False)
        self.register_buffer("weight_scale", scale.clone(), persistent=False)
        input_scale = None if layer.input_scale is None else layer.input_scale.float().reshape(()).to(device)
        self.register_buffer("input_scale", input_scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear_reference(x, self.weight_codes, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 activations={self.activations}"


def attach_emulation(model: nn.Module, layers: dict[str, Fp8Layer]) -> int:
    """Replace every Linear named in `layers` by its emulated FP8 version; returns how many were replaced."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child, None)
        if isinstance(linear, Fp8EmulatedLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: not an nn.Linear in this model ({type(linear).__name__})")
        with torch.no_grad():
            setattr(parent, child, Fp8EmulatedLinear(linear, layer))
    return len(layers)


def detach_emulation(model: nn.Module) -> int:
    """Put plain `nn.Linear`s back (same parameters); returns how many were restored."""
    swapped = [(name, module) for name, module in model.named_modules() if isinstance(module, Fp8EmulatedLinear)]
    for name, module in swapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = module.weight
        linear.bias = module.bias
        setattr(parent, child, linear)
    return len(swapped)
