"""LoRA restricted to the kept weights of a pruned Linear, merged back without touching the zeros.

The effective weight is `W + keep * (B @ A) * alpha / r`, with `keep = (mask == False)`. It is a
`torch.nn.utils.parametrize` parametrization of `weight`, so the module stays an `nn.Linear` under
its own name; `merge_lora` bakes the delta in and removes the parametrization. Since `keep` is 0
wherever W is pruned, merging leaves those weights exactly zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipelines.modeling import decoder_linears


class MaskedLoRA(nn.Module):
    """Parametrization `W -> W + keep * (B @ A) * scale`; B starts at zero so training starts at W."""

    def __init__(self, weight: torch.Tensor, pruned: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("keep", (~pruned).to(weight.dtype), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A) * self.scale * self.keep


def attach_lora(model: nn.Module, masks: dict[str, torch.Tensor], rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze the model and add masked LoRA to every decoder Linear; returns the trainable parameters."""
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name, linear in decoder_linears(model).items():
        lora = MaskedLoRA(linear.weight.detach(), masks[name].to(linear.weight.device), rank, alpha)
        parametrize.register_parametrization(linear, "weight", lora)
        params += [lora.lora_A, lora.lora_B]
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Bake every LoRA delta into its weight and remove the parametrizations; returns how many merged."""
    merged = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    model.requires_grad_(True)
    return merged
