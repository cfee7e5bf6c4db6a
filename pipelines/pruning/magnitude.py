"""Magnitude pruning: drop the smallest |W| of each row (or of each group of M)."""

from __future__ import annotations

from torch import Tensor

from pipelines.pruning.patterns import select_mask
from pipelines.pruning.result import PruneResult


def prune_magnitude(weight: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> PruneResult:
    """Keep the largest |W| per output row (exact count) or the N largest of every M."""
    mask = select_mask(weight.abs().float(), sparsity, nm)
    return PruneResult(weight=weight * mask, mask=mask)
