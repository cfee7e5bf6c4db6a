"""SparseGPT: prune with Optimal Brain Surgeon updates of the remaining weights (Frantar & Alistarh, 2023).

Given the input Hessian H = XᵀX of a Linear, the inverse of H + λI is factored once (upper Cholesky
U), then the columns are visited in blocks: each block chooses its mask from w² / U_jj², prunes
column by column while spreading each column's error over the block's later columns (rank-1
updates), and finally pushes the block's accumulated error onto all later columns with one GEMM.

Differences from the reference implementation, on purpose:

- A Cholesky that fails (H not numerically positive definite) is retried with 10x more damping, up
  to `retries` times, and the damping used is returned; it never falls back to the identity.
- Unstructured masks keep an exact count per output row: block b drops
  `prune_count(i2, s) - prune_count(i1, s)` weights of every row, so each row loses exactly
  `prune_count(columns, s)`. Rows are then independent, so Linears sharing one input (q/k/v,
  gate/up) can be pruned in one call on their row-stacked weights, with one factorization.
- Inputs that were always zero ("dead" columns) score 0, so they are pruned first, but their
  weights are not zeroed when kept, which would break the exact count.
- The work runs on Wᵀ, so the column being pruned is a contiguous row of memory.
- N:M masks are chosen per group by the loss the column loop will really incur: for each of the
  C(M, M-N) ways to prune a group (6 for 2:4, up to `MAX_NM_PATTERNS`), the group's own column
  updates are replayed on its current weights and the summed OBS loss Σ err²/U_jj² is scored; each
  row takes the cheapest. The reference scores each weight alone by w²/U_jj² before any update,
  which ignores that pruning one column of the group moves the later ones. Groups with more
  patterns than the limit use the reference score.
- On CUDA each block's column loop (and, for N:M, the pattern search) is one Triton launch
  (`kernels.obs_block`) instead of a few small kernels per column and about twenty per group; the
  PyTorch loop stays as the reference and the fallback. `solve_path` says which one runs.
"""

from __future__ import annotations

import math
from functools import cache
from itertools import combinations

import torch
from torch import Tensor

from kernels import obs_block
from pipelines.pruning.patterns import check_nm, keep_all_but_lowest, prune_count
from pipelines.pruning.result import PruneResult
from pipelines.stage import StageError

MAX_NM_PATTERNS = 70  # C(8, 4): every 4:8 choice is still scored exactly
FUSED_MAX_PATTERNS = 6  # N:M patterns the fused block takes by default (2:4 has 6); more stay on the PyTorch loop


class HessianNotPositiveDefiniteError(StageError):
    """The damped Hessian could not be factored even after raising the damping `retries` times."""


def inverse_hessian_factor(hessian: Tensor, dampening: float, retries: int = 4) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damping · mean(diag H), and the damping used.

    Starts at `dampening` and multiplies it by 10 after each failed factorization (non-positive
    pivot or non-finite result), at most `retries` times. `hessian` is not modified. One host sync
    or two per attempt.
    """
    if hessian.dtype != torch.float32:
        hessian = hessian.float()
    mean_diag = hessian.diagonal().mean()
    damping = dampening
    for _ in range(retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damping * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:  # cholesky_inverse refuses a factor with a zero pivot, so check first
            upper, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if bool((info_inv == 0) & torch.isfinite(upper).all()):
                return upper, damping
        damping *= 10.0
    raise HessianNotPositiveDefiniteError(
        f"Hessian is not positive definite even with damping {damping / 10.0:g} x mean diagonal "
        f"(dampening {dampening:g}, {retries} retries); use more calibration samples or raise dampening"
    )


def _block_bounds(columns: int, block_size: int, nm: tuple[int, int] | None) -> list[tuple[int, int]]:
    if nm is not None:  # an N:M group must not straddle two blocks
        block_size = max(nm[1], block_size - block_size % nm[1])
    return [(i, min(i + block_size, columns)) for i in range(0, columns, block_size)]


def prune_sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    retries: int = 4,
    act_order: bool = False,
    fused: bool | None = None,
) -> PruneResult:
    """SparseGPT on `weight` [rows, columns] with input Hessian `hessian` [columns, columns].

    Returns the pruned weight (input dtype), the keep-mask, the OBS loss estimate (fp32 scalar
    tensor, on the device) and the damping used. No host sync inside the column loop.
    `act_order` visits columns (N:M: whole groups) by decreasing Hessian diagonal, as GPTQ's
    act-order does: the columns that matter most are decided first, before errors pile onto them.
    `fused` runs each block's column loop as one Triton kernel (`kernels.obs_block`); None chooses
    by `solve_path`, True insists (ValueError if it cannot), False keeps the PyTorch loop.
    """
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({columns}, {columns})")
    if nm is not None:
        check_nm(columns, nm)
    if act_order:
        order = act_order_permutation(hessian, nm)
        result = prune_sparsegpt(weight[:, order], hessian[order][:, order], sparsity, nm, block_size, dampening,
                                 retries, fused=fused)
        inverse = torch.argsort(order)
        return PruneResult(weight=result.weight[:, inverse].contiguous(), mask=result.mask[:, inverse].contiguous(),
                           loss=result.loss, damping=result.damping)
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h.diagonal().masked_fill_(dead, 1.0)
    alive = (~dead).float().unsqueeze(1)
    upper, damping = inverse_hessian_factor(h, dampening, retries)
    del h

    work = weight.float().t().contiguous()  # [columns, rows]: column j of W is row j here
    keep = torch.ones_like(work, dtype=torch.bool)
    loss = torch.zeros((), device=weight.device, dtype=torch.float32)
    use_kernel = _resolve_fused(fused, weight.device, nm, block_size)
    for i1, i2 in _block_bounds(columns, block_size, nm):
        block = work[i1:i2]
        u_block = upper[i1:i2, i1:i2]
        diag = u_block.diagonal().unsqueeze(1)
        block_keep = keep[i1:i2]
        coef = None
        if nm is None:
            drop = prune_count(i2, sparsity) - prune_count(i1, sparsity)
            score = (block / diag).square_().mul_(alive[i1:i2])
            block_keep.copy_(keep_all_but_lowest(score.t(), drop).t())
            coef = (~block_keep).float().div_(diag)
        errors = torch.empty_like(block)
        if use_kernel:
            _fused_block(block, u_block, errors, coef, block_keep, alive[i1:i2, 0], nm)
        else:
            _torch_block(block, u_block, errors, coef, block_keep, alive[i1:i2], diag, nm)
        loss += errors.square().sum() / 2
        if i2 < columns:
            work[i2:].addmm_(upper[i1:i2, i2:].t(), errors, alpha=-1.0)
    pruned = work.t().to(weight.dtype)
    return PruneResult(weight=pruned, mask=keep.t().contiguous(), loss=loss, damping=damping)


def solve_path(device: torch.device, nm: tuple[int, int] | None, block_size: int = 128) -> str:
    """Which column loop `prune_sparsegpt(fused=None)` runs here: "triton" (one kernel per block) or "torch".

    The kernel runs on CUDA when Triton imports, the block fits its registers (`obs_block.MAX_BLOCK`)
    and the pattern is unstructured or has at most `FUSED_MAX_PATTERNS` prune patterns.
    """
    if device.type != "cuda" or not _kernel_fits(nm, block_size):
        return "torch"
    return "triton" if obs_block.available(device) else "torch"


def _kernel_fits(nm: tuple[int, int] | None, block_size: int, max_patterns: int = FUSED_MAX_PATTERNS) -> bool:
    if block_size > obs_block.MAX_BLOCK:
        return False
    return nm is None or math.comb(nm[1], nm[0]) <= max_patterns


def _resolve_fused(fused: bool | None, device: torch.device, nm: tuple[int, int] | None, block_size: int) -> bool:
    if fused is None:
        return solve_path(device, nm, block_size) == "triton"
    if fused and not (_kernel_fits(nm, block_size, MAX_NM_PATTERNS) and obs_block.available(device)):
        raise ValueError(
            f"fused: the Triton block cannot run here (device {device}, pattern {nm}, block_size {block_size}; "
            f"needs CUDA or TRITON_INTERPRET=1, triton, block_size <= {obs_block.MAX_BLOCK}, "
            f"<= {MAX_NM_PATTERNS} patterns)"
        )
    return fused


def _fused_block(
    block: Tensor, u_block: Tensor, errors: Tensor, coef: Tensor | None, block_keep: Tensor, alive: Tensor,
    nm: tuple[int, int] | None,
) -> None:
    """The block's column loop as one Triton launch; same results as `_torch_block` up to rounding."""
    if nm is None:
        obs_block.obs_block(block, u_block, errors, coef=coef)
    else:
        patterns = _pattern_tensor(*nm, block.device, torch.float32)
        obs_block.obs_block(block, u_block, errors, keep=block_keep, alive=alive.contiguous(), patterns=patterns,
                            group=nm[1])


def _torch_block(
    block: Tensor, u_block: Tensor, errors: Tensor, coef: Tensor | None, block_keep: Tensor, alive: Tensor,
    diag: Tensor, nm: tuple[int, int] | None,
) -> None:
    """The block's column loop in PyTorch, a few small ops per column: the reference and the fallback."""
    if coef is None:
        coef = torch.empty_like(block)
    for i in range(block.shape[0]):
        if nm is not None and i % nm[1] == 0:
            _select_group(block, diag, alive, block_keep, coef, i, nm, u_block)
        err = torch.mul(block[i], coef[i], out=errors[i])
        block[i:].addr_(u_block[i, i:], err, alpha=-1.0)
    block.mul_(block_keep)  # pruned entries are ~0 after their own update; make them exactly 0


def act_order_permutation(hessian: Tensor, nm: tuple[int, int] | None) -> Tensor:
    """Column order by decreasing Hessian diagonal; for N:M, whole groups by their summed diagonal."""
    diag = hessian.diagonal().float()
    if nm is None:
        return torch.argsort(diag, descending=True, stable=True)
    m = nm[1]
    groups = torch.argsort(diag.view(-1, m).sum(1), descending=True, stable=True)
    return (groups.unsqueeze(1) * m + torch.arange(m, device=diag.device)).flatten()


@cache
def _prune_patterns(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    """Every choice of the M - N columns of a group to prune, as 0/1 tuples of length M."""
    return tuple(tuple(int(c in pruned) for c in range(m)) for pruned in combinations(range(m), m - n))


def _select_group(
    block: Tensor, diag: Tensor, alive: Tensor, block_keep: Tensor, coef: Tensor, i: int, nm: tuple[int, int],
    u_block: Tensor,
) -> None:
    """Choose the N:M mask of columns i..i+M of the block from their current (updated) weights."""
    n, m = nm
    if math.comb(m, n) <= MAX_NM_PATTERNS:
        group_keep = _cheapest_pattern(block[i : i + m], u_block[i : i + m, i : i + m], alive[i : i + m], nm)
    else:
        score = (block[i : i + m] / diag[i : i + m]).square_().mul_(alive[i : i + m])  # [m, rows]
        kept = torch.topk(score, n, dim=0, sorted=False).indices
        group_keep = torch.zeros_like(score, dtype=torch.bool).scatter_(0, kept, True)
    block_keep[i : i + m] = group_keep
    coef[i : i + m] = (~group_keep).float().div_(diag[i : i + m])


@cache
def _pattern_tensor(n: int, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`_prune_patterns` as a [patterns, m] tensor on the device, made once (a copy per group would sync)."""
    return torch.tensor(_prune_patterns(n, m), dtype=dtype, device=device)


def _cheapest_pattern(weights: Tensor, u: Tensor, alive: Tensor, nm: tuple[int, int]) -> Tensor:
    """Keep-mask [m, rows] of the pattern with the least OBS loss per row (see module doc).

    `weights` [m, rows] are the group's current columns, `u` [m, m] its block of the upper Cholesky
    factor of H⁻¹. Replays the column loop's updates for all patterns at once: [patterns, m, rows].
    """
    prune = _pattern_tensor(*nm, weights.device, weights.dtype)  # [patterns, m]: 1 = pruned
    work = weights.unsqueeze(0).repeat(prune.shape[0], 1, 1)
    loss = torch.zeros(prune.shape[0], weights.shape[1], dtype=weights.dtype, device=weights.device)
    for c in range(weights.shape[0]):
        err = work[:, c] * (prune[:, c : c + 1] / u[c, c])  # [p, rows]
        loss.addcmul_(err, err * alive[c])
        work[:, c:] -= u[c, c:].view(1, -1, 1) * err.unsqueeze(1)
    best = loss.argmin(dim=0)  # [rows]
    return prune[best].t().eq(0)
