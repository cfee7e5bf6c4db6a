"""FP8 E4M3 arithmetic for the "FP8 dynamic" scheme: per-output-channel weight scales, per-token activation scales.

A row r of a tensor is stored as codes q = round_e4m3(x / s_r) with s_r = amax(|x_r|) / 448 (448 is e4m3's
largest finite value), so the row's largest magnitude uses the whole range; dequantized it is q * s_r.
Zeros stay zeros, which keeps a 2:4 pattern intact. A GEMM of two such operands is
y[t, n] = s_x[t] * s_w[n] * sum_k qx[t, k] qw[n, k], with the sum accumulated in fp32.

On a GPU the per-token quantization of the activations is one fused Triton kernel (a row's amax, its scale
and the cast in one pass over the row, instead of the five PyTorch kernels that `quantize_rows_reference`
launches); elsewhere, or without Triton, the reference runs. Everything here is pure functions of tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # an all-zero row gets this scale: its codes are all zero, and dividing by it is safe


@dataclass(frozen=True)
class Fp8Scales:
    """A quantized layer's scales: fp32 per output channel for the weight; for the activations, one static
    fp32 scale from calibration, or None for dynamic per-token scales computed at run time."""

    weight: Tensor
    input: Tensor | None = None

    @classmethod
    def of(cls, scales: Tensor | Fp8Scales) -> Fp8Scales:
        return scales if isinstance(scales, Fp8Scales) else cls(scales)


def row_scales(x: Tensor) -> Tensor:
    """fp32 scale per row of a 2-D tensor: amax(|row|) / 448 (at least `_MIN_SCALE`)."""
    return x.detach().abs().amax(dim=-1).float().div_(FP8_MAX).clamp_(min=_MIN_SCALE)


def quantize_with_scales(x: Tensor, scales: Tensor) -> Tensor:
    """e4m3 codes of `x` [rows, k] with the given per-row fp32 `scales` [rows] (saturating, round to nearest)."""
    return (x.float() / scales.float().unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows_reference(x2d: Tensor, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(e4m3 codes [T, K], fp32 scales [T]) of a 2-D tensor, per row (or all rows with one static scale),
    in plain PyTorch."""
    if static_scale is None:
        scales = row_scales(x2d)
    else:
        scales = static_scale.detach().float().reshape(1).to(x2d.device).expand(x2d.shape[0]).contiguous()
    return quantize_with_scales(x2d, scales), scales


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [rows, k] * scales [rows], in `dtype`."""
    return (codes.float() * scales.float().unsqueeze(-1)).to(dtype)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 codes, fp32 per-output-channel scales) of a Linear weight [out, in]."""
    return quantize_rows_reference(weight.detach())


def reference_linear(x2d: Tensor, w_codes: Tensor, w_scales: Tensor, input_scale: Tensor | None = None) -> Tensor:
    """What an FP8 GEMM with per-token (or one static) activation scale computes, in fp32 (up to the order of
    the sums): the dequantized reference that the FP8 kernels are checked against."""
    xq, xs = quantize_rows_reference(x2d, input_scale)
    return (xq.float() @ w_codes.float().t()) * xs.unsqueeze(1) * w_scales.float().unsqueeze(0)


@functools.cache
def _triton_kernel():
    """The fused per-token quantization kernel, compiled on first use (None: Triton is not importable)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, k, stride_x, stride_q, BLOCK: tl.constexpr,
                             STATIC: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < k
        x = tl.load(x_ptr + row * stride_x + offsets, mask=inside, other=0.0).to(tl.float32)
        if STATIC:  # noqa: SIM108 - a compile-time branch of the Triton kernel
            scale = tl.load(static_ptr)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * stride_q + offsets, q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + row, scale)

    return quantize_rows_kernel


def quantize_rows(x2d: Tensor, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(e4m3 codes [T, K], fp32 scales [T]) per row: one fused kernel on a GPU, the reference elsewhere.

    `static_scale` (an fp32 scalar tensor on the same device): every row uses it instead of its own amax.
    Rows wider than 32768 elements, and non-CUDA tensors, take the reference path."""
    tokens, k = x2d.shape
    kernel = _triton_kernel() if x2d.is_cuda and k <= 32768 else None
    if kernel is None:
        return quantize_rows_reference(x2d, static_scale)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    codes = torch.empty(tokens, k, dtype=FP8, device=x2d.device)
    scales = torch.empty(tokens, dtype=torch.float32, device=x2d.device)
    if tokens:
        block = 1 << (k - 1).bit_length()
        warps = 4 if block <= 4096 else 8 if block <= 16384 else 16
        static = scales if static_scale is None else static_scale
        kernel[(tokens,)](x2d, codes, scales, static, k, x2d.stride(0), codes.stride(0), BLOCK=block,
                          STATIC=static_scale is not None, num_warps=warps)
    return codes, scales
