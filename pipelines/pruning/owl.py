"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023).

A decoder layer's outlier ratio is the fraction of its Wanda scores |W_ij|·‖X_j‖ above
`threshold` times their mean (over all targeted Linears of the layer, on the dense model). Layers
with more outliers are pruned less. Sparsities are an affine, decreasing function of the ratio,
centred on the target and scaled so the largest deviation is exactly λ: every layer lands in
[s - λ, s + λ] and the plain mean over layers is s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.pruning.wanda import wanda_scores


def outlier_ratio(weights: list[Tensor], col_sq_norms: list[Tensor], threshold: float) -> Tensor:
    """Fraction of one layer's scores |W|·‖X‖ above `threshold` × their mean (fp32 scalar tensor)."""
    if not weights or len(weights) != len(col_sq_norms):
        raise ValueError("outlier_ratio needs one column-norm vector per weight, and at least one weight")
    scores = [wanda_scores(w, n) for w, n in zip(weights, col_sq_norms, strict=True)]
    total = sum(s.numel() for s in scores)
    mean = sum(s.sum() for s in scores) / total
    above = sum((s > threshold * mean).sum() for s in scores)
    return above.float() / total


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities: mean `sparsity`, each within `sparsity ± lam`, more outliers -> less sparse."""
    if not ratios:
        return []
    if not (sparsity - lam >= 0.0 and sparsity + lam < 1.0):
        raise ValueError(f"owl_lambda: sparsity {sparsity} +/- {lam} must stay within [0, 1)")
    r = torch.tensor(ratios, dtype=torch.float64)
    centred = r - r.mean()
    spread = centred.abs().max()
    if spread <= 1e-12 * max(float(r.abs().max()), 1e-30):
        return [sparsity] * len(ratios)
    return (sparsity - lam * centred / spread).tolist()
