"""Wanda: score |W_ij| · ‖X_j‖₂ and drop the lowest scores of each output row (Sun et al., 2023)."""

from __future__ import annotations

from torch import Tensor

from pipelines.pruning.patterns import select_mask
from pipelines.pruning.result import PruneResult


def wanda_scores(weight: Tensor, col_sq_norms: Tensor) -> Tensor:
    """|W| times the L2 norm of each input column over the calibration tokens (fp32)."""
    return weight.abs().float() * col_sq_norms.float().sqrt().unsqueeze(0)


def prune_wanda(
    weight: Tensor, col_sq_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> PruneResult:
    """Wanda pruning of `weight` [out, in] given Σ_tokens x_j² per input column `col_sq_norms` [in]."""
    if col_sq_norms.shape != weight.shape[1:]:
        raise ValueError(f"col_sq_norms has shape {tuple(col_sq_norms.shape)}, expected ({weight.shape[1]},)")
    mask = select_mask(wanda_scores(weight, col_sq_norms), sparsity, nm)
    return PruneResult(weight=weight * mask, mask=mask)
