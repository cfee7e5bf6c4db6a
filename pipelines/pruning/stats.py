"""Statistics of a Linear's inputs, accumulated over calibration tokens, and the errors they give.

`xtx` is the sum of x xᵀ over tokens (the unnormalized Hessian of the layer-wise least squares
problem, fp32); its diagonal is the per-column sum of squares that Wanda and OWL use. The driver
accumulates one `InputStats` per distinct input tensor, so Linears that share an input (q/k/v,
gate/up) share one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Running sums over the tokens one input has seen. `xtx` is None when only diagonals are kept."""

    sq_sum: Tensor
    xtx: Tensor | None = None
    tokens: int = 0

    @classmethod
    def empty(cls, columns: int, device: torch.device, full: bool) -> InputStats:
        xtx = torch.zeros(columns, columns, device=device, dtype=torch.float32) if full else None
        return cls(sq_sum=torch.zeros(columns, device=device, dtype=torch.float32), xtx=xtx)

    @property
    def col_sq_norms(self) -> Tensor:
        """Sum over tokens of x_j², per input column j (fp32)."""
        return self.xtx.diagonal() if self.xtx is not None else self.sq_sum

    def hessian(self) -> Tensor:
        """xᵀx averaged over tokens (fp32). Its scale does not change any pruning decision."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the full x xᵀ")
        return self.xtx / max(self.tokens, 1)


def _gram(x: Tensor) -> Tensor:
    """xᵀx in fp32. Half-precision CUDA inputs use fp32 accumulation directly (products of bf16/fp16
    values are exact in fp32, so this equals upcasting first) without the fp32 copy of x."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.t(), x, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    x = x.float()
    return x.t() @ x


def accumulate(stats: InputStats, x: Tensor) -> None:
    """Add the tokens of `x` (any leading shape, last dim = columns) to `stats`, in place."""
    x = x.reshape(-1, x.shape[-1])
    stats.tokens += x.shape[0]
    if stats.xtx is not None:
        stats.xtx.add_(_gram(x))
    else:
        stats.sq_sum.add_(x.float().square().sum(0))


def relative_output_errors(original: Tensor, pruned: Tensor, xtx: Tensor, row_splits: list[int]) -> Tensor:
    """‖(W - Ŵ)X‖² / ‖WX‖² per row block of `original` (one block per Linear of a shared-input group).

    Computed from xᵀx: ‖ΔW X‖² = Σ_rows (ΔW xᵀx) ⊙ ΔW, one GEMM for the whole group. Returns an fp32
    tensor of len(row_splits) values, left on the device (no host sync).
    """
    delta = original.float() - pruned.float()
    stacked = torch.cat([delta, original.float()], 0)
    per_row = ((stacked @ xtx) * stacked).sum(1)
    num, den = per_row[: delta.shape[0]], per_row[delta.shape[0] :]
    num = torch.stack([part.sum() for part in num.split(row_splits)])
    den = torch.stack([part.sum() for part in den.split(row_splits)])
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)
