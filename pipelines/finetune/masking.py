"""Sparsity masks that fine-tuning must preserve.

A mask is captured once, before training, as `weight == 0` of every decoder-layer Linear. Before each
optimizer step the masked gradients are zeroed (so Adam's moments stay zero there); after it the
masked weights are set to zero again (so no optimizer, decay or rounding can revive them).
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.modeling import decoder_linears


def capture_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """`weight == 0` (bool, on the weight's device) for every decoder Linear."""
    return {name: lin.weight.detach() == 0 for name, lin in decoder_linears(model).items()}


class MaskGuard:
    """Binds captured masks to a model's weights and enforces them around optimizer steps."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        linears = decoder_linears(model)
        missing = sorted(set(masks) - set(linears))
        if missing:
            raise KeyError(f"masks for Linears the model lacks: {missing[:5]}")
        self.pairs = [(linears[name].weight, mask.to(linears[name].weight.device)) for name, mask in masks.items()]

    @property
    def masked_count(self) -> int:
        return sum(int(mask.sum()) for _, mask in self.pairs)

    def zero_grads(self) -> None:
        for weight, mask in self.pairs:
            if weight.grad is not None:
                weight.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self.pairs:
            weight.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def changed(self) -> int:
        """How many masked weights are not exactly zero (must be 0)."""
        return sum(int(torch.count_nonzero(weight[mask])) for weight, mask in self.pairs)
