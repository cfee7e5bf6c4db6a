"""The masks artifact: one packed bitmask per pruned Linear, in a safetensors file.

Bit j of byte k in row r is weight (r, 8k + j) (little bit order, as `numpy.packbits(...,
bitorder="little")` and compressed-tensors' bitmasks); 1 means the weight is kept. A [rows, cols]
mask takes rows x ceil(cols / 8) bytes. For each Linear `name` the file holds `name.bitmask`
(uint8) and `name.shape` (int64 [2]); the file metadata records the format and what made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

MASK_FORMAT = "sparseflow-bitmask-v1"
_BITS = 8


def pack_mask(mask: Tensor) -> Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], little bit order, on the mask's device."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    if mask.device.type == "cpu":  # numpy's packbits is a single C loop
        return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    return pack_mask_torch(mask)


def pack_mask_torch(mask: Tensor) -> Tensor:
    """`pack_mask` in torch ops, for masks on an accelerator (no copy of the bool mask to the host)."""
    rows, cols = mask.shape
    pad = (-cols) % _BITS
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, _BITS)
    weights = torch.tensor([1 << j for j in range(_BITS)], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, int] | list[int]) -> Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    rows, cols = int(shape[0]), int(shape[1])
    if packed.shape != (rows, -(-cols // _BITS)):
        raise ValueError(f"packed mask of shape {tuple(packed.shape)} does not fit a {rows}x{cols} mask")
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, -1)[:, :cols].bool()


def save_masks(
    packed: dict[str, Tensor], shapes: dict[str, tuple[int, int]], path: str | Path, meta: dict[str, str] | None = None
) -> Path:
    """Write packed masks (from `pack_mask`) and their dense shapes to `path`."""
    if set(packed) != set(shapes):
        raise ValueError("save_masks: packed masks and shapes must name the same Linears")
    tensors: dict[str, Tensor] = {}
    for name in sorted(packed):
        tensors[f"{name}.bitmask"] = packed[name].to("cpu", torch.uint8).contiguous()
        tensors[f"{name}.shape"] = torch.tensor(shapes[name], dtype=torch.int64)
    metadata = {"format": MASK_FORMAT, **(meta or {}), "linears": json.dumps(sorted(packed))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def save_bool_masks(masks: dict[str, Tensor], path: str | Path, meta: dict[str, str] | None = None) -> Path:
    """Pack and write bool masks."""
    return save_masks(
        {k: pack_mask(v) for k, v in masks.items()}, {k: tuple(v.shape) for k, v in masks.items()}, path, meta
    )


def read_mask_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_masks(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Read a masks file back as bool keep-masks by Linear name."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != MASK_FORMAT:
            raise ValueError(f"{path}: not a {MASK_FORMAT} masks file (format {meta.get('format')!r})")
        names = json.loads(meta["linears"])
        return {
            name: unpack_mask(handle.get_tensor(f"{name}.bitmask"), handle.get_tensor(f"{name}.shape").tolist())
            for name in names
        }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero every masked-out weight of the named Linears, in place (e.g. after an optimizer step)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"mask for {name!r}, which is not a module of this model")
        weight = modules[name].weight
        weight.mul_(mask.to(weight.device, weight.dtype))
