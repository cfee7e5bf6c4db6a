"""Export a pruned model in compressed-tensors' sparse layouts (`sparse-bitmask`, `sparse-24-bitmask`) and load it.

The plain `save_pretrained` directory stays the primary model artifact; this writes a second,
smaller copy (about 56% of the dense bytes at 50% sparsity: half the values plus one bit per weight)
whose pruned Linears are stored the way compressed-tensors' sparse compressors stored them, with its
config (`quantization_config.sparsity_config`, a `BitmaskConfig` or `Sparse24BitMaskConfig`) and its
bit packing (`compressed_tensors.utils.pack_bitmasks`).

Layout per compressed Linear `<module>` (the `.weight` suffix dropped, as compressed-tensors does):

- `sparse-bitmask`: `<module>.shape` int64 [2], `<module>.compressed` the nonzeros in row-major
  order (1-D, weight dtype), `<module>.bitmask` uint8 [rows, ceil(cols/8)] of nonzeros,
  `<module>.row_offsets` int64 [rows], the index in `compressed` where each row starts.
- `sparse-24-bitmask`: `<module>.shape` int64 [2, 1], `<module>.compressed` [rows, cols/2] (the
  two kept values of every group of four), `<module>.bitmask` uint8 [rows, ceil(cols/8)].
- both: `<module>.weight`, an empty [0] tensor (the guard below).

Who can read these layouts (docs/export.md has the table of releases tried; tests/pipelines/
test_export_compat.py runs the newest and the oldest pinned):

- compressed-tensors 0.15 and later ship no sparse compressors (its ModelCompressor says Sparse24 is
  unsupported after 0.14.0, and writes `sparsity_config: {}`), and transformers 5's
  compressed-tensors quantizer builds only the quantization part of the config. vLLM removed its
  Sparse24 integration too (vllm-project/vllm#36799). A stock `from_pretrained` of such a folder then
  finds every pruned Linear's `weight` missing and initialises it randomly, printing only a report
  (transformers 5.24 with compressed-tensors 0.20.1, and 4.57 with 0.15).
- transformers 4.56-5.0 with compressed-tensors 0.12-0.14 still decompress `sparse-24-bitmask` on
  load (in fp16 unless given a dtype); their `sparse-bitmask` path fails on the meta device.

So the decision: keep the compact layouts (size is what this artifact is for) and make every loader
that cannot decompress them fail rather than guess. The `[0]` placeholder `<module>.weight` does it:
a loader that understands the layout replaces the Linear's `weight` with the compressed parameters
before reading the file, so the placeholder is an unused key to it; any other loader finds a [0]
tensor where it expects [out, in] and raises its size-mismatch error. The supported route is
`load_compressed_model(path)`: a standard transformers model with exactly the exported weights,
which `save_pretrained` turns into a plain folder that every version loads.

Values are written in the model's source dtype (see `pipelines.modelio`), so a bf16 model is
exported in bf16 whatever dtype the stage computed in.
"""

from __future__ import annotations

import json
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.config import BitmaskConfig, CompressionFormat, Sparse24BitMaskConfig
from compressed_tensors.utils import get_nested_weight_mappings, pack_bitmasks, unpack_bitmasks
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PreTrainedModel

from pipelines.filemodes import normalize_modes
from pipelines.modeling import decoder_linears
from pipelines.modelio import (
    SOURCE_DTYPE_ATTR,
    cast_state_dict,
    declared_dtype,
    finish_config,
    load_tokenizer,
    source_dtype,
)

SPARSE_BITMASK = CompressionFormat.sparse_bitmask.value
SPARSE_24_BITMASK = CompressionFormat.sparse_24_bitmask.value
FORMAT_PARAMS = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}
WEIGHTS_NAME = "model.safetensors"
MIN_SPARSE_FRACTION = 0.01  # a decoder Linear with fewer exact zeros than this is dense, not pruned


class ExportError(ValueError):
    """A model that cannot be written in the requested format, or a folder that is not such an export."""


def choose_format(nm: tuple[int, int] | None) -> str:
    """`sparse-24-bitmask` for 2:4, else `sparse-bitmask`."""
    return SPARSE_24_BITMASK if nm == (2, 4) else SPARSE_BITMASK


def compress_bitmask(weight: Tensor) -> dict[str, Tensor]:
    """A weight's nonzeros, their bitmask and row offsets (sparse-bitmask)."""
    weight = weight.detach().cpu()
    nonzero = weight != 0
    row_counts = nonzero.sum(-1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[nonzero],
        "bitmask": pack_bitmasks(nonzero),
        "row_offsets": (torch.cumsum(row_counts, 0) - row_counts).to(torch.int64),
    }


def is_24_sparse(weight: Tensor) -> bool:
    """Every group of four consecutive inputs of every row holds at most two nonzeros."""
    rows, cols = weight.shape
    return cols % 4 == 0 and not bool((weight.reshape(rows, cols // 4, 4).ne(0).sum(-1) > 2).any())


def compress_24_bitmask(weight: Tensor, name: str = "weight") -> dict[str, Tensor]:
    """The two kept values of every group of four and their bitmask (sparse-24-bitmask)."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if cols % 4:
        raise ExportError(f"{name}: sparse-24-bitmask needs a column count divisible by 4, got {cols}")
    if not is_24_sparse(weight):
        raise ExportError(f"{name}: not 2:4 sparse (a group of four holds more than two nonzeros)")
    groups = weight.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    keep = keep.reshape(rows, cols)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": weight[keep].reshape(rows, cols // 2),
        "bitmask": pack_bitmasks(keep),
    }


def decompress(params: dict[str, Tensor]) -> Tensor:
    """Dense weight from either format's tensors (`shape`, `compressed`, `bitmask`)."""
    shape = params["shape"].flatten().tolist()
    keep = unpack_bitmasks(params["bitmask"], shape)
    return torch.zeros(shape, dtype=params["compressed"].dtype).masked_scatter_(keep, params["compressed"].flatten())


def infer_export(model: nn.Module) -> tuple[str, list[str], str] | None:
    """(format, modules, sparsity structure) for a model pruned earlier, judged from its zeros; None if dense.

    The pruned Linears are the decoder Linears with at least `MIN_SPARSE_FRACTION` exact zeros; if every
    one of them is 2:4 the export is `sparse-24-bitmask`, else `sparse-bitmask`.
    """
    pruned = {
        name: linear.weight.detach()
        for name, linear in decoder_linears(model).items()
        if float((linear.weight == 0).float().mean()) >= MIN_SPARSE_FRACTION
    }
    if not pruned:
        return None
    if all(is_24_sparse(weight) for weight in pruned.values()):
        return SPARSE_24_BITMASK, sorted(pruned), "2:4"
    return SPARSE_BITMASK, sorted(pruned), "unstructured"


def without_tied_duplicates(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` on the CPU, contiguous, without tied duplicates (the first name of a shared tensor is kept),
    as a plain `save_pretrained` writes it."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def export_compressed(
    model: PreTrainedModel,
    out_dir: str | Path,
    fmt: str,
    modules: list[str],
    *,
    sparsity_structure: str = "unstructured",
    tokenizer_source: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` with the weights of `modules` (Linear names) compressed in `fmt`, in `dtype`.

    `dtype` defaults to the model's source dtype (`pipelines.modelio.source_dtype`).
    """
    if fmt not in FORMAT_PARAMS:
        raise ExportError(f"export: unknown format {fmt!r}; known: {', '.join(FORMAT_PARAMS)}")
    if not modules:
        raise ExportError("export: no modules to compress")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or source_dtype(model)
    state = without_tied_duplicates(cast_state_dict(model, dtype))
    total, zeros = 0, 0
    for module in modules:
        weight = state.pop(f"{module}.weight", None)
        if weight is None:
            raise ExportError(f"export: {module}.weight is not in the model's state dict")
        parts = compress_bitmask(weight) if fmt == SPARSE_BITMASK else compress_24_bitmask(weight, module)
        state.update({f"{module}.{key}": value for key, value in parts.items()})
        state[f"{module}.weight"] = torch.empty(0, dtype=weight.dtype)  # the guard: see the module docstring
        total += weight.numel()
        zeros += int((weight == 0).sum())
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "sparseflow_layout": fmt})

    config_cls = BitmaskConfig if fmt == SPARSE_BITMASK else Sparse24BitMaskConfig
    sparsity_config = config_cls(
        format=fmt,
        targets=sorted(modules),
        ignore=[],
        global_sparsity=zeros / max(total, 1),
        sparsity_structure=sparsity_structure,
    )
    model.config.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity_config.model_dump(),
        "transform_config": {},
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    finish_config(config_path, dtype)
    if tokenizer_source is not None:
        load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    normalize_modes(out_dir)
    return out_dir


def read_sparsity_config(path: str | Path) -> BitmaskConfig | Sparse24BitMaskConfig:
    """The sparsity config of an exported directory, parsed by compressed-tensors."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path}: no config.json, not a model folder")
    data = json.loads(config_path.read_text()).get("quantization_config", {}).get("sparsity_config")
    if not data or data.get("format") not in FORMAT_PARAMS:
        raise ExportError(f"{config_path}: quantization_config.sparsity_config.format is not one of "
                          f"{', '.join(FORMAT_PARAMS)}: not a compressed export (load a plain folder with "
                          "from_pretrained)")
    config_cls = BitmaskConfig if data["format"] == SPARSE_BITMASK else Sparse24BitMaskConfig
    return config_cls.model_validate(data)


def load_compressed_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Dense state dict of an exported directory: compressed Linears are decompressed."""
    path = Path(path)
    fmt = read_sparsity_config(path).format
    nested, other = get_nested_weight_mappings(str(path), list(FORMAT_PARAMS[fmt]), return_unmatched_params=True)
    by_file: dict[str, list[str]] = {}
    for module, files in nested.items():
        missing = set(FORMAT_PARAMS[fmt]) - set(files)
        if missing:
            raise ExportError(f"{path}: {module} lacks {', '.join(sorted(missing))} of the {fmt} layout")
        for param, file in files.items():
            by_file.setdefault(file, []).append(f"{module}.{param}")
    placeholders = {f"{module}.weight" for module in nested}
    for name, file in other.items():
        if name not in placeholders:
            by_file.setdefault(file, []).append(name)
    tensors: dict[str, Tensor] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            tensors.update((name, handle.get_tensor(name)) for name in names)
    state = {name: tensors.pop(name) for name in list(tensors) if name in other}
    for module in nested:
        state[f"{module}.weight"] = decompress({p: tensors.pop(f"{module}.{p}") for p in FORMAT_PARAMS[fmt]})
    return state


def _is_fp8_export(path: Path) -> bool:
    """A quantize stage's export: `quantization_config` with config groups in the `float-quantized` format."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return False
    qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
    return qconfig.get("format") == "float-quantized" and bool(qconfig.get("config_groups"))


def load_compressed_model(
    path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """A standard transformers model (eval mode) with exactly the weights of the export at `path`.

    `dtype` defaults to the dtype the export was written in. The model class is the config's causal-LM
    class, given the decompressed state dict through `from_pretrained(None, config=, state_dict=)` (no
    random initialisation). Every parameter must come from the folder (tied ones excepted); anything
    missing or left over is an `ExportError`. An FP8 export (the quantize stage's) is handed to
    `pipelines.quantize.export.load_fp8_compressed`: dequantized weights, its Linears run as emulated FP8.
    """
    path = Path(path)
    if _is_fp8_export(path):
        # imported here: it imports this module, and only FP8 folders need it (older compressed-tensors
        # releases, which tests/pipelines/test_export_compat.py runs this loader with, never get there)
        from pipelines.quantize.export import load_fp8_compressed  # noqa: PLC0415

        return load_fp8_compressed(path, dtype=dtype, device=device)
    state = load_compressed_state_dict(path)
    stored = declared_dtype(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is dense once decompressed
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ExportError(f"{path}: transformers has no causal-LM class for {type(config).__name__}")
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or stored or torch.float32)
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in state if name in own}
    missing = [name for name, tensor in own.items() if name not in state and tensor.data_ptr() not in loaded]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ExportError(f"{path}: the export does not fit {model_class.__name__}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    setattr(model, SOURCE_DTYPE_ATTR, stored or dtype or torch.float32)
    return model.to(device).eval()
