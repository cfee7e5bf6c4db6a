"""The masks artifact: packed bitmasks round-trip, bit order shared with compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from torch import nn

from pipelines.masks import (
    MASK_FORMAT,
    apply_masks,
    load_masks,
    pack_mask,
    pack_mask_torch,
    read_mask_metadata,
    save_bool_masks,
    save_masks,
    unpack_mask,
)


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_pack_mask_matches_compressed_tensors_bit_order(cols: int) -> None:
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(packed, pack_bitmasks(mask))
    assert torch.equal(pack_mask_torch(mask), packed)  # the accelerator path
    assert torch.equal(unpack_bitmasks(packed, [5, cols]), mask)
    assert torch.equal(unpack_mask(packed, (5, cols)), mask)


def test_unpack_mask_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        unpack_mask(torch.zeros(2, 3, dtype=torch.uint8), (2, 30))


def test_masks_file_round_trips(tmp_path: Path) -> None:
    masks = {
        "model.layers.0.mlp.up_proj": torch.rand(6, 20) > 0.3,
        "model.layers.1.self_attn.q_proj": torch.rand(3, 8) > 0.7,
    }
    path = save_bool_masks(masks, tmp_path / "masks.safetensors", meta={"method": "wanda"})
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded[name], mask)
    meta = read_mask_metadata(path)
    assert meta["format"] == MASK_FORMAT and meta["method"] == "wanda"
    # packed: ~1 bit per weight plus the shape tensors, not a byte
    assert path.stat().st_size < 1024


def test_save_masks_requires_matching_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same Linears"):
        save_masks({"a": torch.zeros(1, 1, dtype=torch.uint8)}, {"b": (1, 8)}, tmp_path / "m.safetensors")


def test_load_masks_rejects_another_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a"):
        load_masks(tmp_path / "other.safetensors")


def test_apply_masks_zeroes_masked_weights() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    mask = torch.rand(4, 8) > 0.5
    apply_masks(model, {"0": mask})
    assert torch.all(model[0].weight[~mask] == 0)
    with pytest.raises(KeyError):
        apply_masks(model, {"missing": mask})
