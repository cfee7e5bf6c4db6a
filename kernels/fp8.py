"""FP8 E4M3 arithmetic for the "FP8 dynamic" scheme: per-output-channel weight scales, per-token activation scales.

A row r of a tensor is stored as codes q = round_e4m3(x / s_r) with s_r = amax(|x_r|) / 448 (448 is e4m3's
largest finite value), so the row's largest magnitude uses the whole range; dequantized it is q * s_r.
Zeros stay zeros, which keeps a 2:4 pattern intact. A GEMM of two such operands is
y[t, n] = s_x[t] * s_w[n] * sum_k qx[t, k] qw[n, k], with the sum accumulated in fp32.

On a GPU the per-token quantization of the activations is one fused kernel (a row's amax, its scale and the
cast in one pass over the row, instead of the five PyTorch kernels that `quantize_rows_reference` launches):
our CUDA kernel (`csrc/fp8_quant.cu`, built with nvcc on first use in a few seconds, called through ctypes
for a few microseconds of host time), or, without nvcc, the same kernel in Triton (whose launch costs tens of
microseconds of host time, which bounds a layer at decode and mid-size token counts). Elsewhere the
reference runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kernels.cutlass24 import current_stream

log = logging.getLogger(__name__)

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
    """fp32 scale per row of a 2-D tensor: amax(|row|) / 448 (at least `_MIN_SCALE`).

    A true division, as the CUDA kernel does: PyTorch divides a tensor by a Python number as a
    multiplication by its reciprocal, which can differ in the last bit, and with bf16 inputs many
    values x / scale sit exactly halfway between two e4m3 codes (an amax like 14 makes the scale an
    exact 14 / 448 = 2^-5), so that last bit would decide a whole row's ties."""
    amax = x.detach().abs().amax(dim=-1).float()
    return torch.div(amax, torch.full_like(amax, FP8_MAX)).clamp_(min=_MIN_SCALE)


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


_QUANT_SOURCE = Path(__file__).with_name("csrc") / "fp8_quant.cu"
_QUANT_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@functools.cache
def _cuda_quantizer():
    """The ctypes entry point of `csrc/fp8_quant.cu`, built into the kernel cache once per source and nvcc
    (None: no nvcc, or the build failed; the reason is logged)."""
    from kernels.cutlass24 import Cutlass24Error, cache_dir, find_nvcc

    try:
        nvcc, release = find_nvcc()
    except Cutlass24Error as error:
        log.info("FP8 quantization kernel not built: %s", error)
        return None
    key = hashlib.sha256(_QUANT_SOURCE.read_bytes() + release.encode()).hexdigest()[:16]
    target = cache_dir() / f"libsf_fp8_quant-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_89,code=sm_89",
               "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90", "-Xcompiler",
               "-fPIC", "-shared", str(_QUANT_SOURCE), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("FP8 quantization kernel failed to build: %s", done.stderr.strip()[-2000:])
            return None
        partial.replace(target)
    function = ctypes.CDLL(str(target)).sf_fp8_quantize_rows
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    function.argtypes = [i32, vp, vp, vp, vp, i32, i32, i64, i64, vp]
    return function


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

    `static_scale` (a scalar tensor): every row uses it instead of its own amax. Non-CUDA tensors take the
    reference path, and so do rows wider than 32768 elements where only the Triton kernel is at hand."""
    tokens, k = x2d.shape
    if not x2d.is_cuda:
        return quantize_rows_reference(x2d, static_scale)
    if static_scale is not None and (static_scale.dtype != torch.float32 or static_scale.device != x2d.device):
        static_scale = static_scale.to(device=x2d.device, dtype=torch.float32)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    codes = torch.empty(tokens, k, dtype=FP8, device=x2d.device)
    scales = torch.empty(tokens, dtype=torch.float32, device=x2d.device)
    cuda = _cuda_quantizer() if x2d.dtype in _QUANT_DTYPES else None
    if cuda is not None:
        static = None if static_scale is None else static_scale.data_ptr()
        status = cuda(_QUANT_DTYPES[x2d.dtype], x2d.data_ptr(), codes.data_ptr(), scales.data_ptr(), static, tokens,
                      k, x2d.stride(0), codes.stride(0), current_stream(x2d.device))
        if status:
            raise RuntimeError(f"FP8 quantization kernel failed with status {status} on {tokens}x{k}")
        return codes, scales
    kernel = _triton_kernel() if k <= 32768 else None
    if kernel is None:
        return quantize_rows_reference(x2d, static_scale)
    if tokens:
        block = 1 << (k - 1).bit_length()
        warps = 4 if block <= 4096 else 8 if block <= 16384 else 16
        static = scales if static_scale is None else static_scale
        kernel[(tokens,)](x2d, codes, scales, static, k, x2d.stride(0), codes.stride(0), BLOCK=block,
                          STATIC=static_scale is not None, num_warps=warps)
    return codes, scales
