"""The FP8 sidecar of a `model` folder: per-Linear scales and the scheme, beside plain HF weights.

A quantize stage's `model` artifact is an ordinary `save_pretrained` folder whose Linear weights are
the dequantized FP8 weights (code * scale, in the model's stored dtype), so every later stage and any
transformers release loads it as usual. What makes it FP8 is one more file in the folder::

    fp8_scales.safetensors
      <module>.weight_scale   fp32 [out]   per-output-channel scale, one per quantized Linear
      <module>.input_scale    fp32 []      static per-tensor input scale (activations: static only)
      metadata (strings): format "sparseflow-fp8", version "1", scheme "fp8_dynamic",
                          activations "dynamic" | "static", fp8_dtype "float8_e4m3fn"

The exact codes come back with `fp8_codes(weight, weight_scale)` (see `pipelines.quantize.fp8`).
A stage that rewrites the model without carrying this file over (nothing does today) hands on a
plain model: FP8 is never claimed for weights that are not on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipelines.filemodes import normalize_modes

SIDECAR_NAME = "fp8_scales.safetensors"
SIDECAR_FORMAT = "sparseflow-fp8"
SIDECAR_VERSION = "1"
SCHEMES = ("fp8_dynamic",)
ACTIVATIONS = ("dynamic", "static")


class Fp8SidecarError(ValueError):
    """An FP8 sidecar that is missing, of another format, or inconsistent."""


@dataclass(frozen=True)
class Fp8Layer:
    """One FP8 Linear: per-output-channel weight scales, the static input scale if any, the activation mode."""

    weight_scale: Tensor
    """fp32 [out]."""
    input_scale: Tensor | None
    """fp32 scalar ([]) with activations 'static', else None (per-token scales computed at run time)."""
    activations: str
    """'dynamic' or 'static'."""


def is_fp8_model(model_dir: str | Path) -> bool:
    """Whether `model_dir` is a model folder written by the quantize stage (it has the FP8 sidecar)."""
    return (Path(model_dir) / SIDECAR_NAME).is_file()


def write_fp8_layers(model_dir: str | Path, layers: dict[str, Fp8Layer], scheme: str = "fp8_dynamic") -> Path:
    """Write the sidecar of `layers` (module name -> Fp8Layer) into `model_dir`."""
    if scheme not in SCHEMES:
        raise Fp8SidecarError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    modes = {layer.activations for layer in layers.values()}
    if len(modes) != 1 or not modes <= set(ACTIVATIONS):
        raise Fp8SidecarError(f"activations must be one of {ACTIVATIONS} and the same for every layer, got {modes}")
    activations = modes.pop()
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.weight_scale"] = layer.weight_scale.detach().float().reshape(-1).contiguous()
        if (layer.input_scale is None) != (activations == "dynamic"):
            raise Fp8SidecarError(f"{name}: input_scale must be given exactly when activations are 'static'")
        if layer.input_scale is not None:
            tensors[f"{name}.input_scale"] = layer.input_scale.detach().float().reshape(()).contiguous()
    path = Path(model_dir) / SIDECAR_NAME
    save_file(tensors, str(path), metadata={
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "scheme": scheme, "activations": activations,
        "fp8_dtype": "float8_e4m3fn",
    })
    normalize_modes(Path(model_dir))
    return path


def read_sidecar_metadata(model_dir: str | Path) -> dict[str, str]:
    """The sidecar's metadata (format, version, scheme, activations, fp8_dtype), checked."""
    path = Path(model_dir) / SIDECAR_NAME
    if not path.is_file():
        raise Fp8SidecarError(f"{model_dir}: no {SIDECAR_NAME}; not an FP8 model folder")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        raise Fp8SidecarError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                              f"{SIDECAR_FORMAT!r} version {SIDECAR_VERSION!r}")
    if meta.get("scheme") not in SCHEMES or meta.get("activations") not in ACTIVATIONS:
        raise Fp8SidecarError(f"{path}: scheme {meta.get('scheme')!r} / activations {meta.get('activations')!r} "
                              "not understood")
    return meta


def read_fp8_layers(model_dir: str | Path) -> dict[str, Fp8Layer]:
    """Module name -> `Fp8Layer` for every quantized Linear of the FP8 model folder `model_dir`."""
    meta = read_sidecar_metadata(model_dir)
    activations = meta["activations"]
    with safe_open(str(Path(model_dir) / SIDECAR_NAME), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    layers: dict[str, Fp8Layer] = {}
    for key, scale in tensors.items():
        if not key.endswith(".weight_scale"):
            continue
        name = key.removesuffix(".weight_scale")
        input_scale = tensors.get(f"{name}.input_scale")
        if (input_scale is None) != (activations == "dynamic"):
            raise Fp8SidecarError(f"{model_dir}: {name} has {'no ' if input_scale is None else ''}input_scale "
                                  f"with activations {activations!r}")
        layers[name] = Fp8Layer(scale.to(torch.float32), None if input_scale is None else input_scale.float(),
                                activations)
    extra = [k for k in tensors if k.endswith(".input_scale") and k.removesuffix(".input_scale") not in layers]
    if extra or not layers:
        raise Fp8SidecarError(f"{model_dir}: sidecar has no layers or stray input scales {extra[:3]}")
    return layers
