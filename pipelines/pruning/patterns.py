"""Which weights a row keeps: mask selection from a score, for unstructured and N:M patterns.

A mask is a bool tensor shaped like the weight, True where the weight is KEPT. Selection is per
output row and vectorized (one `topk` over the row or over all groups of M at once), so the count
is exact: a row of `n` weights at sparsity `s` loses exactly `prune_count(n, s)` of them, and an
N:M row keeps exactly N of every M consecutive weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prune_count(columns: int, sparsity: float) -> int:
    """Weights a row of `columns` loses at `sparsity`: `columns * sparsity` rounded half up.

    The one rounding rule of the package; a small epsilon keeps 0.3 * 10 from flooring to 2.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(columns, math.floor(columns * sparsity + 0.5 + 1e-9))


def check_nm(columns: int, nm: tuple[int, int]) -> None:
    """Raise ValueError unless 0 < N < M and M divides `columns`."""
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"pattern: need 0 < N < M, got {n}:{m}")
    if columns % m:
        raise ValueError(f"pattern: M={m} does not divide the input dimension {columns}")


def keep_all_but_lowest(score: Tensor, k: int) -> Tensor:
    """Per row, drop the `k` lowest-scoring entries: bool mask, exactly `cols - k` True per row."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(score, k, dim=-1, largest=False, sorted=False).indices
        mask.scatter_(-1, drop, False)
    return mask


def unstructured_mask(score: Tensor, sparsity: float) -> Tensor:
    """Per row, keep the highest scores so that exactly `prune_count(cols, sparsity)` are dropped."""
    return keep_all_but_lowest(score, prune_count(score.shape[-1], sparsity))


def nm_mask(score: Tensor, nm: tuple[int, int]) -> Tensor:
    """Keep the N highest scores of every M consecutive entries along the last dimension."""
    n, m = nm
    rows, cols = score.shape
    check_nm(cols, nm)
    groups = score.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def select_mask(score: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """`nm_mask` for an N:M pattern (sparsity is then 1 - N/M), else `unstructured_mask`."""
    return nm_mask(score, nm) if nm is not None else unstructured_mask(score, sparsity)


def pattern_sparsity(sparsity: float, nm: tuple[int, int] | None) -> float:
    """The sparsity a pattern actually gives: 1 - N/M for N:M, else `sparsity`."""
    return 1.0 - nm[0] / nm[1] if nm is not None else sparsity


def is_nm_sparse(weight: Tensor, nm: tuple[int, int]) -> bool:
    """Whether every group of M consecutive weights along each row holds at most N nonzeros."""
    n, m = nm
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool((weight.reshape(rows, cols // m, m).ne(0).sum(-1) <= n).all())
