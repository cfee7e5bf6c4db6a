"""FP8 codes in compressed-tensors' `sparse-24-bitmask` layout (the prune export's, with E4M3 values).

Per Linear: `shape` int64 [2, 1], `compressed` E4M3 [rows, cols/2] (the two kept codes of every group of
four inputs), `bitmask` uint8 [rows, ceil(cols/8)] (`compressed_tensors.utils.pack_bitmasks`), and the
empty `[0]` `weight` guard of `pipelines.export`, so that a loader without a sparse decompressor fails
instead of initialising the weight randomly. The values are handled as bytes (`view(torch.uint8)`):
several CPU ops are not implemented for float8 tensors.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from torch import Tensor

from pipelines.export import ExportError
from pipelines.quantize.fp8 import FP8_DTYPE

PARAMS = ("shape", "compressed", "bitmask")


def pack_fp8_24(codes: Tensor, name: str = "weight") -> dict[str, Tensor]:
    """The 2:4 bitmask layout of E4M3 codes [rows, cols]; ExportError if a group holds more than two nonzeros."""
    rows, cols = codes.shape
    if cols % 4:
        raise ExportError(f"{name}: sparse-24-bitmask needs a column count divisible by 4, got {cols}")
    nonzero = codes.view(torch.uint8) != 0  # codes are canonical: zero is 0x00 only
    groups = nonzero.reshape(rows, cols // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ExportError(f"{name}: not 2:4 sparse (a group of four holds more than two nonzero FP8 codes)")
    # keep the nonzeros, then fill up to two per group with the first zeros (stable sort: nonzeros first)
    order = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    keep = torch.zeros_like(groups).scatter_(-1, order, True).reshape(rows, cols)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": codes.view(torch.uint8)[keep].reshape(rows, cols // 2).view(FP8_DTYPE),
        "bitmask": pack_bitmasks(keep),
    }


def unpack_fp8_24(params: dict[str, Tensor]) -> Tensor:
    """E4M3 codes [rows, cols] from `pack_fp8_24`'s tensors."""
    shape = params["shape"].flatten().tolist()
    keep = unpack_bitmasks(params["bitmask"], shape)
    values = params["compressed"].view(torch.uint8).flatten()
    if int(keep.sum()) != values.numel():
        raise ExportError(f"sparse-24-bitmask: bitmask selects {int(keep.sum())} values, {values.numel()} stored")
    return torch.zeros(shape, dtype=torch.uint8).masked_scatter_(keep, values).view(FP8_DTYPE)
