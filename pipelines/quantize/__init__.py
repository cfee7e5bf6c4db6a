"""FP8 E4M3 quantization (compressed-tensors' FP8_DYNAMIC scheme): formats, CPU emulation, sidecar, export.

The public API (the kernel tuner and the evaluate stage use it; keep the names):

- `read_fp8_layers(model_dir) -> dict[str, Fp8Layer]`: module name -> per-channel weight scales, the
  static input scale (or None) and the activation mode, from a quantize stage's `model` folder.
- `fp8_codes(weight, weight_scale) -> Tensor[float8_e4m3fn]`: the exact codes of a stored weight.
- `is_fp8_model(model_dir) -> bool`.

Submodules: `fp8` (pure tensor functions), `sidecar` (the `model` folder's scales file), `emulate` (FP8
Linears computed on CPU), `apply` (quantize a model in place, observe static input scales), `export`
(the compressed-tensors folder and its loader). Importing this package loads torch but not transformers.
"""

from pipelines.quantize.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Error,
    dequantize_weight,
    fp8_codes,
    fp8_linear_reference,
    per_token_scales,
    quantize_activation,
    quantize_weight,
    weight_scales,
)
from pipelines.quantize.sidecar import (
    SIDECAR_NAME,
    Fp8Layer,
    Fp8SidecarError,
    is_fp8_model,
    read_fp8_layers,
    read_sidecar_metadata,
)

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "SIDECAR_NAME", "Fp8Error", "Fp8Layer", "Fp8SidecarError", "dequantize_weight",
    "fp8_codes", "fp8_linear_reference", "is_fp8_model", "per_token_scales", "quantize_activation",
    "quantize_weight", "read_fp8_layers", "read_sidecar_metadata", "weight_scales",
]
