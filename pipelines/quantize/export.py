"""The FP8 `compressed_model`: compressed-tensors' `float-quantized` layout with its quantization and sparsity configs.

Per quantized Linear `<module>`: `<module>.weight` the E4M3 codes (`float8_e4m3fn` [out, in], pruned
zeros are code 0), `<module>.weight_scale` [out, 1] and, with static activations, `<module>.input_scale`
[1], both in the model's stored dtype (compressed-tensors allocates them in the weight's dtype; the
scales were rounded to it when quantizing, so nothing changes on load). Every other tensor is stored
as in a plain folder. `config.json` carries `quantization_config` with one config group whose
`weights` and `input_activations` are compressed-tensors' FP8_DYNAMIC preset (input per token,
dynamic) or, for static activations, per-tensor static inputs; `format: float-quantized`.

Sparsity: compressed-tensors 0.15 and later ship no sparse compressor and stock loaders no longer read
the `sparse-24-bitmask` layout (docs/export.md), so the 2:4 structure of a pruned FP8 model is recorded,
not packed: `sparsity_config` is a `DenseSparsityConfig` (`format: dense`) naming the pruned Linears,
`sparsity_structure: "2:4"` and the global sparsity. The zeros are kept exactly (code 0). This folder
loads with compressed-tensors' own lifecycle, with stock `AutoModelForCausalLM.from_pretrained`, and with
`load_fp8_compressed` (our loader: the dequantized weights plus, by default, the FP8 emulation).

On request (`export: sparse-24-bitmask` in the recipe) the codes are packed instead: every quantized
Linear in the 2:4 bitmask layout with E4M3 values (`pipelines.quantize.pack24`), a `Sparse24BitMaskConfig`
beside the same quantization config, and the `[0]` weight guard of `pipelines.export`. It is 0.625
bytes per weight instead of 1, but only `load_fp8_compressed` reads it; stock loaders refuse it (tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.config import CompressionFormat, DenseSparsityConfig, Sparse24BitMaskConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PreTrainedModel

from pipelines.export import ExportError, infer_export, without_tied_duplicates
from pipelines.filemodes import normalize_modes
from pipelines.modelio import SOURCE_DTYPE_ATTR, cast_state_dict, declared_dtype, finish_config, load_tokenizer
from pipelines.quantize.emulate import attach_emulation
from pipelines.quantize.fp8 import FP8_DTYPE, fp8_codes
from pipelines.quantize.pack24 import PARAMS as PACKED_PARAMS
from pipelines.quantize.pack24 import pack_fp8_24, unpack_fp8_24
from pipelines.quantize.sidecar import Fp8Layer

WEIGHTS_NAME = "model.safetensors"
FLOAT_QUANTIZED = CompressionFormat.float_quantized.value
SPARSE_24_BITMASK = CompressionFormat.sparse_24_bitmask.value
EXPORT_FORMATS = (FLOAT_QUANTIZED, SPARSE_24_BITMASK)


def fp8_scheme(targets: list[str], activations: str) -> QuantizationScheme:
    """compressed-tensors' FP8_DYNAMIC scheme (or its static per-tensor input variant) over `targets`."""
    weights = QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.CHANNEL,
                               symmetric=True, dynamic=False)
    if activations == "dynamic":
        inputs = QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TOKEN,
                                  symmetric=True, dynamic=True)
    else:
        inputs = QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR,
                                  symmetric=True, dynamic=False)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


def export_fp8_compressed(
    model: PreTrainedModel, out_dir: str | Path, layers: dict[str, Fp8Layer], dtype: torch.dtype, *,
    tokenizer_source: str | Path | None = None, fmt: str = FLOAT_QUANTIZED,
) -> Path:
    """Write `model` (its target weights already on the FP8 grid) with `layers` as compressed-tensors FP8.

    `fmt`: `float-quantized` (dense codes, loads with stock tools) or `sparse-24-bitmask` (the codes of
    every quantized Linear packed 2:4, `pipelines.quantize.pack24`; only `load_fp8_compressed` reads it).
    """
    if not layers:
        raise ExportError("export: no quantized Linears")
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export: unknown format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sparse = infer_export(model)  # computed before the weights are replaced by codes below
    state = without_tied_duplicates(cast_state_dict(model, dtype))
    modes = {layer.activations for layer in layers.values()}
    for name, layer in layers.items():
        weight = state.pop(f"{name}.weight", None)
        if weight is None:
            raise ExportError(f"export: {name}.weight is not in the model's state dict")
        codes = fp8_codes(weight, layer.weight_scale).contiguous()
        if fmt == SPARSE_24_BITMASK:
            state.update({f"{name}.{key}": value for key, value in pack_fp8_24(codes, name).items()})
            state[f"{name}.weight"] = torch.empty(0, dtype=FP8_DTYPE)  # the guard of pipelines.export
        else:
            state[f"{name}.weight"] = codes
        state[f"{name}.weight_scale"] = layer.weight_scale.to(dtype).reshape(-1, 1).contiguous()
        if layer.input_scale is not None:
            state[f"{name}.input_scale"] = layer.input_scale.to(dtype).reshape(1).contiguous()
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})

    (activations,) = modes
    qconfig = QuantizationConfig(
        config_groups={"group_0": fp8_scheme(sorted(layers), activations)}, format=FLOAT_QUANTIZED,
        quantization_status=QuantizationStatus.COMPRESSED, ignore=[],
    )
    sparsity = {}
    if fmt == SPARSE_24_BITMASK:
        sparse = (fmt, sorted(layers), "2:4")
    if sparse is not None:
        _, pruned, structure = sparse
        numel = sum(model.get_submodule(n).weight.numel() for n in pruned)
        zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in pruned)
        config_cls = Sparse24BitMaskConfig if fmt == SPARSE_24_BITMASK else DenseSparsityConfig
        sparsity = config_cls(format=fmt if fmt == SPARSE_24_BITMASK else CompressionFormat.dense.value,
                              targets=pruned, ignore=[], global_sparsity=zeros / max(numel, 1),
                              sparsity_structure=structure).model_dump()
    model.config.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
        "sparsity_config": sparsity, "transform_config": {},
        **qconfig.model_dump(mode="json", exclude={"quant_method"}),
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    finish_config(config_path, dtype)
    if tokenizer_source is not None:
        load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    normalize_modes(out_dir)
    return out_dir


def is_fp8_export(path: str | Path) -> bool:
    """Whether `path` holds a compressed-tensors export with an FP8 `float-quantized` quantization config."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
    return qconfig.get("format") == FLOAT_QUANTIZED and bool(qconfig.get("config_groups"))


def _read_export(path: Path) -> tuple[dict[str, Tensor], dict[str, Fp8Layer]]:
    """(dense state dict in fp32 for quantized weights, layers) of an FP8 export."""
    qconfig = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    groups = list(qconfig.config_groups.values())
    if len(groups) != 1 or groups[0].input_activations is None:
        raise ExportError(f"{path}: expected one FP8 config group with input activations, got {len(groups)}")
    activations = "dynamic" if groups[0].input_activations.dynamic else "static"
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path}: no safetensors files")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors.update((key, handle.get_tensor(key)) for key in handle.keys())  # noqa: SIM118
    layers: dict[str, Fp8Layer] = {}
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        if f"{name}.compressed" in tensors:  # sparse-24-bitmask
            tensors[f"{name}.weight"] = unpack_fp8_24({p: tensors.pop(f"{name}.{p}") for p in PACKED_PARAMS})
        codes = tensors[f"{name}.weight"]
        if codes.dtype != FP8_DTYPE:
            raise ExportError(f"{path}: {name}.weight is {codes.dtype}, expected {FP8_DTYPE}")
        scale = tensors.pop(key).float().reshape(-1)
        input_scale = tensors.pop(f"{name}.input_scale", None)
        layers[name] = Fp8Layer(scale, None if input_scale is None else input_scale.float().reshape(()), activations)
        tensors[f"{name}.weight"] = codes.float() * scale.reshape(-1, 1)
    return tensors, layers


def load_fp8_compressed(
    path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", emulate: bool = True,
) -> PreTrainedModel:
    """A standard transformers model of the FP8 export at `path`: weights dequantized (codes * scale), and,
    with `emulate`, every quantized Linear run as FP8 (`pipelines.quantize.emulate`).

    `dtype` defaults to the dtype the export declares. Anything missing or left over is an `ExportError`.
    """
    path = Path(path)
    state, layers = _read_export(path)
    stored = declared_dtype(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ExportError(f"{path}: transformers has no causal-LM class for {type(config).__name__}")
    dtype = dtype or stored or torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in state if name in own}
    missing = [name for name, tensor in own.items() if name not in state and tensor.data_ptr() not in loaded]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ExportError(f"{path}: the export does not fit {model_class.__name__}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    setattr(model, SOURCE_DTYPE_ATTR, stored or dtype)
    model = model.to(device).eval()
    if emulate:
        attach_emulation(model, layers)
    return model


def export_layers(path: str | Path) -> dict[str, Fp8Layer]:
    """The `Fp8Layer` of every quantized Linear of an FP8 export (scales as stored, upcast to fp32)."""
    return _read_export(Path(path))[1]

