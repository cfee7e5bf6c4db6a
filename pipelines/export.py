"""Export a pruned model in compressed-tensors' sparse formats (`sparse-bitmask`, `sparse-24-bitmask`).

The plain `save_pretrained` directory stays the primary model artifact; this writes a second,
smaller copy whose pruned Linears are stored the way compressed-tensors' sparse compressors store
them, with its config (`quantization_config.sparsity_config`, a `BitmaskConfig` or
`Sparse24BitMaskConfig` of the installed compressed-tensors) and its bit packing
(`compressed_tensors.utils.pack_bitmasks`).

Layout per compressed Linear `<module>` (the `.weight` suffix dropped, as compressed-tensors does):

- `sparse-bitmask`: `<module>.shape` int64 [2], `<module>.compressed` the nonzeros in row-major
  order (1-D, weight dtype), `<module>.bitmask` uint8 [rows, ceil(cols/8)] of nonzeros,
  `<module>.row_offsets` int64 [rows], the index in `compressed` where each row starts.
- `sparse-24-bitmask`: `<module>.shape` int64 [2, 1], `<module>.compressed` [rows, cols/2] (the
  two kept values of every group of four), `<module>.bitmask` uint8 [rows, ceil(cols/8)].

compressed-tensors 0.14+ keeps these format names and config classes but no longer ships the
sparse compressors themselves, so compressing and decompressing are done here, with its helpers;
`load_compressed_state_dict` finds the tensors with its `get_nested_weight_mappings`.
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
from transformers import PreTrainedModel

from pipelines.modelio import load_tokenizer

SPARSE_BITMASK = CompressionFormat.sparse_bitmask.value
SPARSE_24_BITMASK = CompressionFormat.sparse_24_bitmask.value
FORMAT_PARAMS = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}
WEIGHTS_NAME = "model.safetensors"


class ExportError(ValueError):
    """A model that cannot be written in the requested format."""


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


def compress_24_bitmask(weight: Tensor, name: str = "weight") -> dict[str, Tensor]:
    """The two kept values of every group of four and their bitmask (sparse-24-bitmask)."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if cols % 4:
        raise ExportError(f"{name}: sparse-24-bitmask needs a column count divisible by 4, got {cols}")
    groups = weight.reshape(rows, cols // 4, 4)
    if bool((groups.ne(0).sum(-1) > 2).any()):
        raise ExportError(f"{name}: not 2:4 sparse (a group of four holds more than two nonzeros)")
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
    dense = torch.zeros(shape, dtype=params["compressed"].dtype)
    dense[keep] = params["compressed"].flatten()
    return dense


def _unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without tied duplicates (the first name of a shared tensor is kept)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
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
) -> Path:
    """Write `model` with the weights of `modules` (Linear names) compressed in `fmt`."""
    if fmt not in FORMAT_PARAMS:
        raise ExportError(f"export: unknown format {fmt!r}; known: {', '.join(FORMAT_PARAMS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _unique_state_dict(model)
    total, zeros = 0, 0
    for module in modules:
        weight = state.pop(f"{module}.weight", None)
        if weight is None:
            raise ExportError(f"export: {module}.weight is not in the model's state dict")
        parts = compress_bitmask(weight) if fmt == SPARSE_BITMASK else compress_24_bitmask(weight, module)
        state.update({f"{module}.{key}": value for key, value in parts.items()})
        total += weight.numel()
        zeros += int((weight == 0).sum())
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})

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
    if tokenizer_source is not None:
        load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    return out_dir


def read_sparsity_config(path: str | Path) -> BitmaskConfig | Sparse24BitMaskConfig:
    """The sparsity config of an exported directory, parsed by compressed-tensors."""
    data = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["sparsity_config"]
    config_cls = BitmaskConfig if data["format"] == SPARSE_BITMASK else Sparse24BitMaskConfig
    return config_cls.model_validate(data)


def load_compressed_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Dense state dict of an exported directory: compressed Linears are decompressed."""
    path = Path(path)
    fmt = read_sparsity_config(path).format
    nested, other = get_nested_weight_mappings(str(path), list(FORMAT_PARAMS[fmt]), return_unmatched_params=True)
    state: dict[str, Tensor] = {}
    for module, files in nested.items():
        params = {}
        for param, file in files.items():
            with safe_open(file, framework="pt") as handle:
                params[param] = handle.get_tensor(f"{module}.{param}")
        state[f"{module}.weight"] = decompress(params)
    for name, file in other.items():
        with safe_open(file, framework="pt") as handle:
            state[name] = handle.get_tensor(name)
    return state
