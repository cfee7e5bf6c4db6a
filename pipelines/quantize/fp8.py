"""FP8 E4M3 (`torch.float8_e4m3fn`) quantization as pure tensor functions: scales, codes, dequantization.

The scheme is compressed-tensors' FP8_DYNAMIC: symmetric, no zero point; weights with one scale per
output channel (row), activations with one scale per token computed at run time, or (the `static`
option) one scale per tensor fixed from calibration. A scale maps a row's (or token's) largest |value|
onto 448, the largest finite E4M3 value; values are divided by the scale, clamped to [-448, 448]
(E4M3FN has no infinity: an unclamped cast of anything beyond 448 gives NaN) and rounded to the
nearest E4M3 value by the cast. Zero maps to the code 0 and back to exactly 0, so a pruned weight
stays pruned.

A real FP8 GEMM computes `out[t, o] = sx[t] * sw[o] * sum_i xq[t, i] * wq[o, i]` with fp32 accumulation
(`torch._scaled_mm` with per-token and per-channel scales). Every product of two E4M3 codes is exact in
fp32 (4 + 4 significant bits), so `fp8_linear_reference` below computes the same numbers up to the
order of the fp32 additions. It is the reference of the CPU emulation and of the GPU kernels' checks.

Weight scales are rounded to the model's stored dtype (bf16 for a bf16 model), since compressed-tensors
loads `weight_scale` in the weight's dtype: an fp32 scale would be rounded on load and dequantize to
other weights than ours.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


class Fp8Error(ValueError):
    """A tensor that cannot be quantized as asked (non-finite values, a scale the dtype cannot hold)."""


def _scale_from_amax(amax: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """amax / 448 in fp32, rounded to `scale_dtype` and back; an all-zero row or token gets scale 1."""
    amax = amax.float()
    if not bool(torch.isfinite(amax).all()):
        raise Fp8Error("cannot quantize non-finite values (inf or NaN) to FP8")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scale = scale.to(scale_dtype).float()
    if not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise Fp8Error(f"a scale underflows or overflows in {scale_dtype} (|values| {float(amax.min()):g} "
                       f"to {float(amax.max()):g})")
    return scale


def weight_scales(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-output-channel scales, fp32 [out]: max |w| of each row / 448 (rows of zeros: 1)."""
    if weight.ndim != 2:
        raise Fp8Error(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    return _scale_from_amax(weight.detach().abs().amax(dim=1), scale_dtype)


_NEGATIVE_ZERO = 0x80


def to_codes(values: Tensor, scale: Tensor, canonical_zero: bool = True) -> Tensor:
    """`values / scale`, clamped to +-448 and rounded to E4M3 (scale broadcasts against `values`).

    With `canonical_zero`, zero is always the code 0x00: a -0.0 (a negative weight masked by
    multiplication, or a tiny negative value rounded away) would otherwise give 0x80, equal as a number
    but not as a byte, and byte-level consumers (a 2:4 compressor testing codes != 0) must see the same
    zeros as the arithmetic does. Activations skip it (it costs a pass; arithmetic does not care).
    """
    scaled = values.float() / scale
    codes = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if not canonical_zero:
        return codes
    raw = codes.view(torch.uint8)
    return raw.masked_fill(raw == _NEGATIVE_ZERO, 0).view(FP8_DTYPE)


def quantize_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """E4M3 codes [out, in] of a weight with per-row scales `scale` [out] (moved to the weight's device)."""
    return to_codes(weight.detach(), scale.to(weight.device).reshape(-1, 1))


def dequantize_weight(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes * scale per row, computed in fp32, then cast to `dtype`."""
    return (codes.float() * scale.to(codes.device).float().reshape(-1, 1)).to(dtype)


def fp8_codes(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """The exact E4M3 codes of a stored dequantized weight (`dequantize_weight` output in fp32, bf16 or fp16).

    A stored value is `code * scale` rounded to the storage dtype, a relative error of at most 2^-9 for
    bf16, while neighbouring E4M3 values are at least 2^-4 apart relative to their size (2^-9 absolute
    for subnormal codes), so dividing by the scale and rounding to E4M3 returns the code exactly. The
    quantize stage checks this for every layer it writes.
    """
    return quantize_weight(weight, weight_scale.float())


def per_token_scales(x: Tensor) -> Tensor:
    """Dynamic activation scales, fp32 [..., 1]: max |x| over the last dimension / 448 (zero tokens: 1)."""
    amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    return _scale_from_amax(amax, torch.float32)


def tensor_scale(amax: float | Tensor, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """A static per-tensor scale, fp32 scalar, from an observed max |x|."""
    return _scale_from_amax(torch.as_tensor(amax, dtype=torch.float32).reshape(()), scale_dtype)


def quantize_activation(x: Tensor, input_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes, scales) of activations: per token when `input_scale` is None, else with that static scale.

    A static scale saturates: values beyond 448 * scale become +-448 codes, as an FP8 kernel's cast does.
    """
    scale = per_token_scales(x) if input_scale is None else input_scale.float().reshape(())
    return to_codes(x, scale, canonical_zero=False), scale


def fake_quantize_activation(x: Tensor, input_scale: Tensor | None = None) -> Tensor:
    """Activations rounded to the FP8 grid and scaled back, in fp32."""
    codes, scale = quantize_activation(x, input_scale)
    return codes.float() * scale


def fp8_linear_reference(
    x: Tensor, weight_codes: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
    input_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> Tensor:
    """What an FP8 GEMM with fp32 accumulation computes: quantize x, multiply codes in fp32, apply scales.

    `weight_codes` may be E4M3 or already upcast to fp32 (the emulation caches them upcast).
    """
    x_codes, x_scale = quantize_activation(x, input_scale)
    out = torch.nn.functional.linear(x_codes.float(), weight_codes.float())
    out.mul_(x_scale).mul_(weight_scale.float())  # in place: the emulation runs every Linear of a model
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype or x.dtype)


def quantization_error(weight: Tensor, dequantized: Tensor) -> dict[str, float]:
    """Relative Frobenius error and max abs error of a weight's FP8 round trip (both in fp32)."""
    weight, dequantized = weight.detach().float(), dequantized.detach().float()
    diff = dequantized - weight
    norm = float(weight.norm())
    return {"rel_error": float(diff.norm()) / norm if norm > 0 else 0.0, "max_abs_error": float(diff.abs().max())}
