"""2:4 semi-structured sparsity: the mask, a reference packing, and the storage format.

Three pure-torch pieces, all CPU-capable and vectorized (no per-column loops):

- `mask_24` keeps the two largest-magnitude weights of every group of four consecutive input
  weights; `is_24` checks that a weight already follows the pattern (at most two non-zeros a group).
- `Packed24` is the reference of what a 2:4 kernel consumes: the kept values, (out, in/2), and
  2-bit positions of each kept value inside its group, two groups to a byte. GPU backends use their
  own hardware layouts (cuSPARSELt compresses on the device); this one is the readable reference
  they are checked against.
- `Sparse24Bitmask` is compressed-tensors' `sparse-24-bitmask` storage layout: `shape`, the kept
  values `compressed` (out, in/2) and a little-endian bitmask (out, ceil(in/8)) of their places.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FORMAT_NAME = "sparse-24-bitmask"
_GROUP = 4
_KEEP = 2


class Sparse24Error(ValueError):
    """A tensor that cannot be handled as 2:4 sparse (wrong rank, width or pattern)."""


def _check_2d(weight: Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise Sparse24Error(f"2:4 sparsity needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % _GROUP:
        raise Sparse24Error(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
    return rows, cols


def mask_24(weight: Tensor) -> Tensor:
    """Boolean mask keeping the 2 largest |w| of each group of 4 along the input dimension."""
    rows, cols = _check_2d(weight)
    groups = weight.detach().abs().reshape(rows, cols // _GROUP, _GROUP)
    top = groups.topk(_KEEP, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, top, True)
    return mask.reshape(rows, cols)


def is_24(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive input weights holds at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % _GROUP or weight.numel() == 0:
        return False
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, _GROUP).sum(-1)
    return bool((nonzero <= _KEEP).all())


def mask_from_zero_pattern(weight: Tensor) -> Tensor:
    """The 2:4 mask implied by a weight that already follows the pattern.

    Groups with fewer than two non-zeros still get exactly two kept places (the non-zeros first,
    then the lowest-index zeros), so the mask always has exactly two `True` a group.
    """
    if not is_24(weight):
        raise Sparse24Error("weight does not follow 2:4: some group of 4 has more than 2 non-zeros")
    rows, cols = weight.shape
    nonzero = (weight.detach() != 0).reshape(rows, cols // _GROUP, _GROUP)
    # rank places: non-zeros first, then by index; keep the first two
    position = torch.arange(_GROUP, device=weight.device)
    score = nonzero.to(torch.int8) * _GROUP + (_GROUP - 1 - position).to(torch.int8)
    top = score.topk(_KEEP, dim=-1).indices
    mask = torch.zeros(nonzero.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, top, True)
    return mask.reshape(rows, cols)


def _check_mask(weight: Tensor, mask: Tensor) -> None:
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise Sparse24Error(f"mask must be bool of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    per_group = mask.reshape(weight.shape[0], -1, _GROUP).sum(-1)
    if not bool((per_group == _KEEP).all()):
        raise Sparse24Error("mask must keep exactly 2 of every 4 consecutive input weights")


def pack_bits(bits: Tensor) -> Tensor:
    """Bool (rows, cols) -> uint8 (rows, ceil(cols/8)), little-endian within a byte (numpy's 'little')."""
    rows, cols = bits.shape
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, (-cols) % 8))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 (rows, ceil(cols/8)) -> bool (rows, cols)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


@dataclass(frozen=True)
class Packed24:
    """Reference 2:4 packing: kept values plus 2-bit in-group positions, two groups a byte.

    `values[r, 2g + j]` is the j-th kept weight (in index order) of group g of row r; its position
    inside the group is bits `4*(g%2) + 2*j` .. `+1` of `meta[r, g // 2]`.
    """

    shape: tuple[int, int]
    values: Tensor
    meta: Tensor

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> Packed24:
        rows, cols = _check_2d(weight)
        mask = mask_24(weight) if mask is None else mask
        _check_mask(weight, mask)
        values = weight[mask].reshape(rows, cols // 2)
        groups = mask.reshape(rows, cols // _GROUP, _GROUP)
        position = torch.arange(_GROUP, device=weight.device).expand_as(groups)
        kept = position[groups].reshape(rows, cols // _GROUP, _KEEP).to(torch.uint8)
        nibbles = kept[..., 0] | (kept[..., 1] << 2)
        nibbles = torch.nn.functional.pad(nibbles, (0, nibbles.shape[1] % 2)).reshape(rows, -1, 2)
        meta = nibbles[..., 0] | (nibbles[..., 1] << 4)
        return cls((rows, cols), values, meta)

    def indices(self) -> Tensor:
        """Positions (0..3) of the kept values inside their groups: (rows, cols/4, 2) int64."""
        rows, cols = self.shape
        nibbles = torch.stack([self.meta & 0x0F, self.meta >> 4], dim=-1).reshape(rows, -1)
        nibbles = nibbles[:, : cols // _GROUP]
        return torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1).long()

    def to_dense(self) -> Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols // _GROUP, _GROUP, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(-1, self.indices(), self.values.reshape(rows, cols // _GROUP, _KEEP))
        return dense.reshape(rows, cols)


@dataclass(frozen=True)
class Sparse24Bitmask:
    """compressed-tensors' `sparse-24-bitmask` layout for one weight.

    Matches `Sparse24BitMaskTensor` (compressed-tensors <= 0.14): `compressed` holds the kept values
    row-major (out, in/2), `bitmask` their places, packed little-endian (out, ceil(in/8)) uint8.
    """

    shape: tuple[int, int]
    compressed: Tensor
    bitmask: Tensor

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> Sparse24Bitmask:
        rows, cols = _check_2d(weight)
        mask = mask_24(weight) if mask is None else mask
        _check_mask(weight, mask)
        compressed = weight[mask].reshape(rows, cols // 2)
        return cls((rows, cols), compressed, pack_bits(mask))

    def mask(self) -> Tensor:
        return unpack_bits(self.bitmask, self.shape[1])

    def decompress(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.compressed.dtype, device=self.compressed.device)
        dense[self.mask()] = self.compressed.flatten()
        return dense

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Tensors under compressed-tensors' names: `<prefix>.shape|compressed|bitmask`."""
        prefix = prefix.removesuffix(".weight")
        return {
            f"{prefix}.shape": torch.tensor(self.shape).reshape(-1, 1),
            f"{prefix}.compressed": self.compressed,
            f"{prefix}.bitmask": self.bitmask,
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str) -> Sparse24Bitmask:
        prefix = prefix.removesuffix(".weight")
        try:
            shape = tuple(int(v) for v in tensors[f"{prefix}.shape"].flatten().tolist())
            return cls((shape[0], shape[1]), tensors[f"{prefix}.compressed"], tensors[f"{prefix}.bitmask"])
        except KeyError as error:
            raise Sparse24Error(f"{prefix}: missing {error.args[0]!r} in a {FORMAT_NAME} state dict") from error


def sparsity_config(global_sparsity: float, targets: list[str], ignore: list[str]) -> dict[str, Any]:
    """The `sparsity_config` block compressed-tensors writes into config.json for this format."""
    return {
        "format": FORMAT_NAME,
        "global_sparsity": float(global_sparsity),
        "sparsity_structure": "2:4",
        "targets": list(targets),
        "ignore": list(ignore),
        "registry_requires_subclass": False,
    }
