"""One column block of the SparseGPT solve in one Triton launch (the OBS column loop, fused).

SparseGPT visits a block of B columns of Wᵀ (`block` [B, rows], `u` the block's [B, B] upper Cholesky
factor of H⁻¹) one column at a time: err = block[i] · coef[i], then block[i:] -= u[i, i:] ⊗ err.
In PyTorch that is a few small kernels per column, and an N:M pattern search adds about twenty per
group; on a GPU the loop is bound by launches, not arithmetic. Within a block the output rows are
independent (row r's updates only read row r and the shared `u`), so here each program takes a tile
of rows (a tile along the contiguous dimension of `block`) and all B columns, keeps the tile in
registers and runs the whole loop over the columns.

For N:M, at the start of each group of M columns the program scores every prune pattern exactly as
`pipelines.pruning.sparsegpt._cheapest_pattern` does: the group's own column updates are replayed per
pattern on its current weights and Σ alive · err² is summed (err already carries the 1 / U_jj), and
each row takes the cheapest pattern, the first one on ties, as `torch.argmin` does. Unstructured masks
are chosen before the launch (one `topk` per block) and come in as `coef`.

Results match the PyTorch loop up to floating-point rounding (a fused multiply-add here and there),
so a mask can differ only where two patterns' losses tie to rounding. Triton is imported on first use,
never at import time; `available()` says whether the kernel can run at all.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

ROWS_PER_PROGRAM = 32  # rows per program for blocks up to 128 columns: a [128, 32] fp32 tile is 32 registers a
# thread at 4 warps, and a 4096-row weight still gives 128 programs
NUM_WARPS = 4
MAX_BLOCK = 256  # widest column block kept in registers; wider blocks stay on the PyTorch loop


def available(device: torch.device) -> bool:
    """Whether the fused block can run for tensors on `device`: CUDA (or Triton's interpreter) and Triton."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return False
    return _kernel() is not None


@functools.cache
def _kernel():
    """The fused block kernel, compiled on first use (None: Triton is not importable)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def obs_block_kernel(
        block_ptr, errors_ptr, coef_ptr, keep_ptr, u_ptr, alive_ptr, prune_ptr,
        rows, width, su_r, su_c, n_patterns,
        M: tl.constexpr, MP: tl.constexpr, IS_NM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = offs_r < rows
        offs_b = tl.arange(0, BLOCK_B)
        in_block = offs_b < width
        tile_offsets = offs_b[:, None] * rows + offs_r[None, :]
        tile_mask = in_block[:, None] & in_rows[None, :]
        tile = tl.load(block_ptr + tile_offsets, mask=tile_mask, other=0.0)
        for g in range(0, width // M):
            i0 = g * M
            if IS_NM:
                # The group's M current columns, [MP, BLOCK_R], then every pattern's replayed loss.
                offs_m = tl.arange(0, MP)
                group = tl.zeros([MP, BLOCK_R], dtype=tl.float32)
                for c in tl.static_range(M):
                    column = tl.sum(tl.where(offs_b[:, None] == i0 + c, tile, 0.0), axis=0)
                    group = tl.where(offs_m[:, None] == c, column[None, :], group)
                best_loss = tl.full([BLOCK_R], float("inf"), tl.float32)
                best = tl.zeros([BLOCK_R], dtype=tl.int32)
                for p in range(0, n_patterns):
                    replay = group
                    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
                    for c in tl.static_range(M):
                        i = i0 + c
                        pattern_coef = tl.load(prune_ptr + p * M + c) / tl.load(u_ptr + i * (su_r + su_c))
                        err = tl.sum(tl.where(offs_m[:, None] == c, replay, 0.0), axis=0) * pattern_coef
                        loss += err * (err * tl.load(alive_ptr + i))
                        in_group = (offs_m >= c) & (offs_m < M)
                        u_row = tl.load(u_ptr + i * su_r + (i0 + offs_m) * su_c, mask=in_group, other=0.0)
                        replay = replay - u_row[:, None] * err[None, :]
                    better = loss < best_loss  # strict: the first minimum wins, as torch.argmin
                    best_loss = tl.where(better, loss, best_loss)
                    best = tl.where(better, p, best)
            for c in tl.static_range(M):
                i = i0 + c
                x = tl.sum(tl.where(offs_b[:, None] == i, tile, 0.0), axis=0)
                if IS_NM:
                    pruned = tl.load(prune_ptr + best * M + c)  # 1.0 where this row's pattern prunes column i
                    coef = pruned / tl.load(u_ptr + i * (su_r + su_c))
                    tl.store(keep_ptr + i * rows + offs_r, (pruned == 0.0).to(tl.uint8), mask=in_rows)
                else:
                    coef = tl.load(coef_ptr + i * rows + offs_r, mask=in_rows, other=0.0)
                err = x * coef
                tl.store(errors_ptr + i * rows + offs_r, err, mask=in_rows)
                u_row = tl.load(u_ptr + i * su_r + offs_b * su_c, mask=(offs_b > i) & in_block, other=0.0)
                # Column i is final after its own update: kept weights are unchanged (err = 0) and pruned
                # ones are exactly 0 (the PyTorch loop gets ~0 and then multiplies by the mask).
                final = tl.where(coef != 0.0, 0.0, x)
                tile = tl.where(offs_b[:, None] == i, final[None, :], tile - u_row[:, None] * err[None, :])
        tl.store(block_ptr + tile_offsets, tile, mask=tile_mask)

    return obs_block_kernel


def obs_block(
    block: Tensor, u_block: Tensor, errors: Tensor, *, coef: Tensor | None = None, keep: Tensor | None = None,
    alive: Tensor | None = None, patterns: Tensor | None = None, group: int = 1,
    rows_per_program: int | None = None, num_warps: int = NUM_WARPS,
) -> None:
    """Run one block's column loop in place: `block` [B, rows] is updated and masked, `errors` [B, rows] written.

    Unstructured: pass `coef` [B, rows] (1/U_jj where pruned, 0 where kept). N:M: pass `keep` [B, rows]
    (bool, written), `alive` [B] (1.0 / 0.0 per column), `patterns` [P, M] (fp32, 1.0 = pruned) and
    `group` = M. `u_block` is the block's square of the upper factor (any strides); everything else
    contiguous fp32 on one device.
    """
    width, rows = block.shape
    nm = patterns is not None
    block_b = max(16, 1 << (width - 1).bit_length())
    if rows_per_program is None:  # the same tile size for blocks wider than 128 columns
        rows_per_program = max(8, ROWS_PER_PROGRAM * 128 // block_b) if block_b > 128 else ROWS_PER_PROGRAM
    if width > MAX_BLOCK:
        raise ValueError(f"block: {width} columns exceed the fused kernel's limit of {MAX_BLOCK}")
    if nm and (keep is None or alive is None or width % group or patterns.shape[1] != group):
        raise ValueError(f"patterns: N:M needs keep, alive, patterns [P, {group}] and a width divisible by {group}")
    if rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program: must be a power of two, got {rows_per_program}")
    if not nm and coef is None:
        raise ValueError("coef: the unstructured block needs its coefficients")
    for name, t in (("block", block), ("errors", errors), ("coef", coef), ("keep", keep), ("alive", alive)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("triton is not importable")
    if rows == 0 or width == 0:
        return
    dummy = block  # pointers the chosen branch never reads
    grid = (-(-rows // rows_per_program),)
    kernel[grid](
        block, errors, coef if coef is not None else dummy,
        keep.view(torch.uint8) if keep is not None else dummy, u_block,
        alive if alive is not None else dummy, patterns if patterns is not None else dummy,
        rows, width, u_block.stride(0), u_block.stride(1), patterns.shape[0] if nm else 0,
        M=group if nm else 1, MP=max(2, 1 << (group - 1).bit_length()), IS_NM=nm, BLOCK_B=block_b,
        BLOCK_R=rows_per_program, num_warps=num_warps,
    )
