"""GPTQ-style FP8 weight rounding: E4M3 codes chosen column by column with the error spread by H⁻¹.

Round-to-nearest quantizes each weight on its own. GPTQ (Frantar et al., 2022; the same OBS update that
SparseGPT uses to prune) rounds one input column at a time and moves each row's rounding error onto the
columns not rounded yet, weighted by the inverse Hessian H = X Xᵀ of the layer's calibration inputs, so
the layer's outputs on that data change less. Two things differ from integer GPTQ:

- the grid is E4M3 with the per-row scales fixed up front from the original weights (max|w| / 448,
  rounded to the stored dtype); a weight pushed past 448 * scale by the updates saturates;
- the zero pattern is fixed: a weight that is exactly zero (pruned) is "rounded" to 0 whatever the
  updates moved it to, and its error is spread like any other, so the 2:4 zeros stay exactly zero.

`act_order` rounds the columns by decreasing Hessian diagonal (GPTQ's act-order): the inputs that carry
the most energy are rounded first, while every other column can still absorb their errors. On the
default model it took dense FP8's perplexity loss from +1.81% to +1.50% (bench/fp8_quality.py).

Pure tensor function, like `pipelines.pruning.sparsegpt`; the quantize stage drives it layer by layer
with `pipelines.pruning.sequential.run_sequential`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.pruning.sparsegpt import act_order_permutation, inverse_hessian_factor
from pipelines.quantize.fp8 import to_codes


def gptq_fp8(weight: Tensor, hessian: Tensor, scale: Tensor, *, block_size: int = 128,
             dampening: float = 0.01, act_order: bool = False) -> tuple[Tensor, float]:
    """(dequantized weight on the E4M3 grid of `scale` [out], fp32, damping used) for `weight` [out, in].

    Exact zeros of `weight` are zeros of the result. The scales are per row, so visiting the columns in
    another order (`act_order`) changes which errors are compensated, never the grid.
    """
    if act_order:
        order = act_order_permutation(hessian, None)
        rounded, damping = gptq_fp8(weight[:, order], hessian[order][:, order], scale, block_size=block_size,
                                    dampening=dampening)
        return rounded[:, torch.argsort(order)].contiguous(), damping
    w = weight.detach().float().clone()
    keep = w != 0
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs never seen: nothing to compensate through them
    h.diagonal()[dead] = 1.0
    hinv, damping = inverse_hessian_factor(h, dampening)
    del h
    scale = scale.float().reshape(-1, 1).to(w.device)
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            col = block[:, i]
            rounded = to_codes(col.unsqueeze(1), scale).float().squeeze(1) * scale.squeeze(1)
            rounded = rounded * keep[:, start + i]
            error = (col - rounded) / hblock[i, i]
            block[:, i:] -= error.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            block[:, i] = rounded
            errors[:, i] = error
        w[:, start:end] = block
        if end < columns:
            w[:, end:] -= errors @ hinv[start:end, end:]
    return w, damping
