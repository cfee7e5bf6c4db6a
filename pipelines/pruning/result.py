"""What every pruning method returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PruneResult:
    """A pruned weight (dtype of the input), its keep-mask (True = kept), and method-specific numbers.

    `loss` is SparseGPT's OBS estimate of the output error (None for the other methods);
    `damping` is the diagonal damping SparseGPT actually used, as a fraction of the mean Hessian
    diagonal (None for the other methods).
    """

    weight: Tensor
    mask: Tensor
    loss: Tensor | None = None
    damping: float | None = None
