"""Activation-sparse down projection: skip the FFN neurons whose activation is below a threshold.

For a gated FFN, `y = down_proj(h)` with `h = act(gate(x)) * up(x)` [tokens, intermediate]. When
entries of `h` with `|h| < threshold` are zeroed, the columns of `down_proj.weight` [hidden,
intermediate] of neurons inactive for every token contribute nothing, and a decode step (1-16
tokens) need not read them: the rows of the transposed weight `weight_t` [intermediate, hidden]
of inactive neurons are never loaded (the bytes read fall with the fraction of neurons no token
needs).

The Triton kernel is one launch: each program takes a tile of output columns and a short slice of
the neurons (split-K, `rows_per_program`), thresholds its slice of `h`, loads only the weight rows
of neurons some token needs (a masked load issues no memory traffic for masked-off rows), and adds
its fp32 partial sum atomically into a workspace. The last program of a column tile to finish (a
per-tile counter, incremented atomically) writes the output in the activation dtype and zeroes
the workspace tile and the counter for the next call. No index compaction, memset or cast
kernel: an earlier version that compacted the active neuron indices first spent ~30 us of
launches per call, more than a dense 4096x14336 product takes; one with long neuron slices per
program was latency-bound (~40 us at any sparsity on an H200). The atomic adds make the last bits
of the fp32 sum depend on the order programs finish: repeated calls may differ by an fp16 ulp.
One token (the common decode step) takes its own kernel: a GEMV on the CUDA cores whose partial
sums are stored per slice and added by the last program in one load, with no atomic contention.

- `SparseDown.from_dense` holds the transposed weight the kernel consumes (`decompress` gives back
  the dense weight) and the kernel's counters.
- `active_columns` lists the active neurons (for statistics and the reference); `gather_down_reference`
  is the readable pure-torch version of the kernel; `dense_down` the dense thresholded product every
  sparse path is checked against.
- `sparse_down_proj` runs the Triton kernel on a CUDA tensor of at most `MAX_DECODE_TOKENS` tokens;
  callers fall back to `dense_down` elsewhere (`can_use_kernel` says why not). Everything stays on
  the device (no host sync), so a decode step can be captured in a CUDA graph.

This module imports only torch and (optionally) triton, so that GPU benchmarks can use it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: the CPU machine has no triton; every caller checks `triton is not None`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

MAX_DECODE_TOKENS = 16


class ActivationSparseError(ValueError):
    """Arguments the activation-sparse down projection cannot take (shape, dtype, device)."""


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the kernel: output columns per program, neurons per step, neurons per program.

    Short slices (`rows_per_program`, rounded up to a multiple of `block_k`) give thousands of
    programs, which is what hides the memory latency of the dependent loads (h, then the rows it needs).
    """

    block_n: int = 128
    block_k: int = 32
    rows_per_program: int = 128
    num_warps: int = 2


def default_config(tokens: int) -> KernelConfig:
    """The fastest tiles measured by `bench/activation_kernel_probe.py` (H200, 4096x14336 fp16): narrow
    column tiles with long neuron slices for one token (few partial sums per output to add), short
    slices with wider tiles for more tokens."""
    return KernelConfig(32, 32, 512, 1) if tokens == 1 else KernelConfig(128, 32, 128, 2)


@dataclass
class SparseDown:
    """A down projection ready for the kernel: `weight_t` [intermediate, hidden], contiguous.

    `counters` holds, per column-tile width, the kernel's int32 completion counters, and
    `workspace` its fp32 [16, hidden] sums: both zero between calls (the kernel resets them).
    """

    weight_t: Tensor
    bias: Tensor | None = None
    counters: dict[int, Tensor] = field(default_factory=dict)
    workspace: Tensor | None = None

    def workspace_for(self) -> Tensor:
        if self.workspace is None:
            self.workspace = torch.zeros(MAX_DECODE_TOKENS, self.hidden, dtype=torch.float32,
                                         device=self.weight_t.device)
        return self.workspace

    def counters_for(self, block_n: int) -> Tensor:
        if block_n not in self.counters:
            tiles = -(-self.hidden // block_n)
            self.counters[block_n] = torch.zeros(tiles, dtype=torch.int32, device=self.weight_t.device)
        return self.counters[block_n]

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None) -> SparseDown:
        """From `down_proj.weight` [hidden, intermediate] (and its bias)."""
        if weight.dim() != 2:
            raise ActivationSparseError(f"down_proj weight must be 2-D, got shape {tuple(weight.shape)}")
        return cls(weight_t=weight.detach().t().contiguous(), bias=None if bias is None else bias.detach())

    def decompress(self) -> Tensor:
        """The dense `[hidden, intermediate]` weight again."""
        return self.weight_t.t().contiguous()

    @property
    def intermediate(self) -> int:
        return self.weight_t.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight_t.shape[1]


def threshold_activations(h: Tensor, threshold: float) -> Tensor:
    """`h` with entries `|h| < threshold` set to zero; `h` itself (no copy) for threshold 0."""
    if threshold <= 0:
        return h
    return torch.where(h.abs() < threshold, torch.zeros((), dtype=h.dtype, device=h.device), h)


def dense_down(h: Tensor, weight: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """The dense reference: `F.linear(threshold_activations(h), weight, bias)`; bit-identical to dense at 0."""
    return F.linear(threshold_activations(h, threshold), weight, bias)


def active_columns(h2d: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Neurons active (`|h| >= threshold`) for at least one token, compacted in increasing order.

    Returns `idx` int32 [intermediate + 1] whose first `count` entries are the active neurons (the
    rest is scratch), and `count` int32 [1], on `h2d`'s device: no host synchronization.
    """
    intermediate = h2d.shape[-1]
    active = (h2d.abs() >= threshold).any(dim=0)
    position = torch.cumsum(active, dim=0, dtype=torch.int32)
    slot = torch.where(active, position - 1, torch.full_like(position, intermediate))
    idx = torch.empty(intermediate + 1, dtype=torch.int32, device=h2d.device)
    idx.scatter_(0, slot.long(), torch.arange(intermediate, dtype=torch.int32, device=h2d.device))
    return idx, position[-1:].clone()


def gather_down_reference(h2d: Tensor, down: SparseDown, threshold: float) -> Tensor:
    """What the kernel computes, in plain torch: gather the active rows of `weight_t`, multiply, add bias."""
    idx, count = active_columns(h2d, threshold)
    keep = idx[: int(count.item())].long()
    h_active = threshold_activations(h2d[:, keep], threshold)
    acc = torch.promote_types(h2d.dtype, torch.float32)
    out = (h_active.to(acc) @ down.weight_t[keep].to(acc)).to(h2d.dtype)
    return out if down.bias is None else out + down.bias


def can_use_kernel(h: Tensor, down: SparseDown) -> tuple[bool, str]:
    """Whether `sparse_down_proj` can run on these tensors, and if not, why."""
    if triton is None:
        return False, "triton is not installed"
    if not (h.is_cuda and down.weight_t.is_cuda):
        return False, "tensors are not on a CUDA device"
    tokens = h.numel() // h.shape[-1] if h.numel() else 0
    if not 1 <= tokens <= MAX_DECODE_TOKENS:
        return False, f"{tokens} tokens: the sparse down kernel serves decode steps of 1-{MAX_DECODE_TOKENS} tokens"
    if h.dtype != down.weight_t.dtype or h.dtype not in (torch.float16, torch.bfloat16):
        return False, f"needs matching fp16/bf16 activations and weight, got {h.dtype} and {down.weight_t.dtype}"
    if h.shape[-1] != down.intermediate:
        return False, f"activations have {h.shape[-1]} neurons, the weight {down.intermediate}"
    return True, ""


def sparse_down_proj(h: Tensor, down: SparseDown, threshold: float, config: KernelConfig | None = None) -> Tensor:
    """Thresholded down projection of a decode step with the Triton kernel: `[..., intermediate] -> [..., hidden]`.

    Raises `ActivationSparseError` where the kernel cannot run (see `can_use_kernel`); callers use
    `dense_down` there.
    """
    ok, why = can_use_kernel(h, down)
    if not ok:
        raise ActivationSparseError(f"sparse down kernel unavailable: {why}")
    h2d = h.reshape(-1, h.shape[-1])
    result = launch_sparse_down(h2d, down, threshold, config or default_config(h2d.shape[0]))
    if down.bias is not None:
        result = result + down.bias
    return result.reshape(*h.shape[:-1], down.hidden)


def launch_sparse_down(h2d: Tensor, down: SparseDown, threshold: float, config: KernelConfig) -> Tensor:
    """Launch the Triton kernel on `h2d` [tokens <= 16, intermediate] without the device checks (bias not added).

    `sparse_down_proj` is the checked entry point; this one also runs under `TRITON_INTERPRET=1` on CPU
    tensors, which is how the kernel is checked on a machine without a GPU.
    """
    if triton is None:
        raise ActivationSparseError("sparse down kernel unavailable: triton is not installed")
    if h2d.shape[0] > MAX_DECODE_TOKENS:
        raise ActivationSparseError(f"{h2d.shape[0]} tokens: the kernel takes at most {MAX_DECODE_TOKENS}")
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    tokens, hidden, intermediate = h2d.shape[0], down.hidden, down.intermediate
    rows = triton.cdiv(min(config.rows_per_program, intermediate), config.block_k) * config.block_k
    split_k = triton.cdiv(intermediate, rows)
    out = torch.empty(tokens, hidden, dtype=h2d.dtype, device=h2d.device)
    grid = (triton.cdiv(hidden, config.block_n), split_k)
    if tokens == 1:
        partials = torch.empty(split_k, hidden, dtype=torch.float32, device=h2d.device)
        _sparse_gemv_kernel[grid](
            h2d, down.weight_t, partials, down.counters_for(config.block_n), out, float(threshold),
            hidden, intermediate, rows, split_k, down.weight_t.stride(0),
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_PAD=triton.next_power_of_2(split_k),
            num_warps=config.num_warps,
        )
        return out
    _sparse_down_kernel[grid](
        h2d, down.weight_t, down.workspace_for(), down.counters_for(config.block_n), out, float(threshold),
        tokens, hidden, intermediate, rows, split_k, h2d.stride(0), down.weight_t.stride(0), out.stride(0),
        BLOCK_M=MAX_DECODE_TOKENS, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )
    return out


if triton is not None:

    @triton.jit
    def _sparse_down_kernel(
        h_ptr, wt_ptr, ws_ptr, count_ptr, out_ptr, threshold, M, N, K, ROWS, SPLIT_K,
        stride_hm, stride_wk, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[m, n] = sum_k thr(h[m, k]) * wt[k, n], reading only rows k that some token m needs."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * ROWS
        k_end = tl.minimum(k_start + ROWS, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            keep = tl.abs(h.to(tl.float32)) >= threshold
            h = tl.where(keep, h, tl.zeros_like(h))
            needed = (tl.max(keep.to(tl.int32), axis=0) > 0) & k_ok  # [BLOCK_K]: some token needs neuron k
            w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=needed[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.dot(h, w)
        tile_ok = m_ok[:, None] & n_ok[None, :]
        sums = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(sums, acc, mask=tile_ok, sem="relaxed")
        # acq_rel: this program's sums land before the count rises; the last program sees them all
        finished = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if finished == SPLIT_K - 1:
            total = tl.load(sums, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                     mask=tile_ok)
            tl.store(sums, tl.zeros_like(total), mask=tile_ok)
            tl.atomic_xchg(count_ptr + pid_n, 0)

    @triton.jit
    def _sparse_gemv_kernel(
        h_ptr, wt_ptr, part_ptr, count_ptr, out_ptr, threshold, N, K, ROWS, SPLIT_K, stride_wk,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_PAD: tl.constexpr,
    ):
        """One token: out[n] = sum_k thr(h[k]) * wt[k, n] on the CUDA cores, reading only rows with |h[k]| >= thr.

        Partial sums go to `part_ptr` [SPLIT_K, N] with plain stores (no atomic contention on the
        output); the last program of a column tile adds them in one 2-D load.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = pid_k * ROWS
        k_end = tl.minimum(k_start + ROWS, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            h = tl.load(h_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            needed = (tl.abs(h) >= threshold) & k_ok
            w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=needed[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.sum(w.to(tl.float32) * tl.where(needed, h, 0.0)[:, None], axis=0)
        tl.store(part_ptr + pid_k * N + offs_n, acc, mask=n_ok)
        finished = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if finished == SPLIT_K - 1:
            splits = tl.arange(0, SPLIT_PAD)
            parts = tl.load(part_ptr + splits[:, None] * N + offs_n[None, :],
                            mask=(splits < SPLIT_K)[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_n, tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(count_ptr + pid_n, 0)
