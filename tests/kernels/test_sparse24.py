"""2:4 mask, reference packing and the sparse-24-bitmask storage format (CPU only)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kernels.sparse24 import (
    FORMAT_NAME,
    Packed24,
    Sparse24Bitmask,
    Sparse24Error,
    is_24,
    mask_24,
    mask_from_zero_pattern,
    pack_bits,
    sparsity_config,
    unpack_bits,
)

GOLDEN = Path(__file__).parent / "data" / "sparse24_bitmask_golden.safetensors"


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(24, 64, generator=torch.Generator().manual_seed(1))


def test_mask_keeps_exactly_two_of_each_group_of_four(weight):
    mask = mask_24(weight)
    assert mask.dtype == torch.bool
    assert (mask.reshape(24, -1, 4).sum(-1) == 2).all()
    assert mask.float().mean().item() == 0.5


def test_mask_keeps_the_two_largest_magnitudes(weight):
    groups = weight.abs().reshape(24, -1, 4)
    kept = groups[mask_24(weight).reshape(24, -1, 4)].reshape(24, -1, 2)
    dropped = groups[~mask_24(weight).reshape(24, -1, 4)].reshape(24, -1, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()


def test_mask_rejects_width_not_divisible_by_four():
    with pytest.raises(Sparse24Error, match="divisible by 4"):
        mask_24(torch.randn(4, 6))


def test_is_24_on_pruned_dense_and_odd_shapes(weight):
    assert is_24(weight * mask_24(weight))
    assert not is_24(weight)
    assert not is_24(torch.randn(4, 6))
    assert is_24(torch.zeros(4, 8))


def test_mask_from_zero_pattern_recovers_mask_and_fills_sparse_groups(weight):
    pruned = weight * mask_24(weight)
    assert torch.equal(mask_from_zero_pattern(pruned), mask_24(weight))
    sparser = pruned.clone()
    sparser[:, :4] = 0  # a group with no non-zero still gets two places
    mask = mask_from_zero_pattern(sparser)
    assert (mask.reshape(24, -1, 4).sum(-1) == 2).all()
    assert torch.equal(sparser * mask, sparser)
    with pytest.raises(Sparse24Error, match="more than 2 non-zeros"):
        mask_from_zero_pattern(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [8, 36, 64])
def test_packed24_round_trip(dtype, cols):
    w = torch.randn(5, cols).to(dtype)
    packed = Packed24.from_dense(w)
    assert packed.values.shape == (5, cols // 2)
    assert packed.meta.shape == (5, (cols // 4 + 1) // 2) and packed.meta.dtype == torch.uint8
    assert torch.equal(packed.to_dense(), w * mask_24(w))


def test_packed24_metadata_holds_in_group_positions():
    w = torch.tensor([[0.0, 5.0, 0.0, -7.0, 9.0, 0.0, 0.0, 1.0]])
    packed = Packed24.from_dense(w)
    assert packed.values.tolist() == [[5.0, -7.0, 9.0, 1.0]]
    assert packed.indices().tolist() == [[[1, 3], [0, 3]]]
    # group 0 -> nibble 1 | 3<<2 = 13, group 1 -> 0 | 3<<2 = 12, packed low nibble first
    assert packed.meta.tolist() == [[13 | (12 << 4)]]


def test_packed24_rejects_a_mask_that_is_not_2_of_4(weight):
    bad = torch.ones_like(weight, dtype=torch.bool)
    with pytest.raises(Sparse24Error, match="exactly 2 of every 4"):
        Packed24.from_dense(weight, bad)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 36])
def test_pack_bits_round_trip_and_little_endian(cols):
    bits = torch.rand(3, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bits(bits)
    assert packed.shape == (3, (cols + 7) // 8)
    assert torch.equal(unpack_bits(packed, cols), bits)
    one = torch.zeros(1, 8, dtype=torch.bool)
    one[0, 0] = True
    assert pack_bits(one).item() == 1


def test_bitmask_round_trip_and_state_dict_names(weight):
    w = weight.to(torch.float16)
    fmt = Sparse24Bitmask.from_dense(w)
    assert torch.equal(fmt.decompress(), w * mask_24(w))
    tensors = fmt.state_dict("model.layers.0.mlp.up_proj.weight")
    assert set(tensors) == {f"model.layers.0.mlp.up_proj.{n}" for n in ("shape", "compressed", "bitmask")}
    back = Sparse24Bitmask.from_state_dict(tensors, "model.layers.0.mlp.up_proj")
    assert torch.equal(back.decompress(), fmt.decompress())
    with pytest.raises(Sparse24Error, match="missing"):
        Sparse24Bitmask.from_state_dict({}, "x")


@pytest.mark.parametrize("name", ["a", "b"])
def test_bitmask_matches_compressed_tensors_compressor_bit_for_bit(name):
    """Golden outputs of compressed-tensors 0.12.2's Sparse24BitMaskCompressor (make_sparse24_golden.py)."""
    golden = load_file(str(GOLDEN))
    dense = golden[f"input.{name}.weight"]
    ours = Sparse24Bitmask.from_dense(dense).state_dict(name)
    for key, value in ours.items():
        assert torch.equal(value, golden[f"output.{key}"]), key
    theirs = Sparse24Bitmask.from_state_dict(golden, f"output.{name}")
    assert torch.equal(theirs.decompress(), dense * mask_24(dense))


def test_bitmask_agrees_with_installed_compressed_tensors_bit_helpers(weight):
    helpers = pytest.importorskip("compressed_tensors.utils")
    fmt = Sparse24Bitmask.from_dense(weight)
    assert torch.equal(helpers.unpack_bitmasks(fmt.bitmask, list(weight.shape)), fmt.mask())
    assert torch.equal(helpers.pack_bitmasks(fmt.mask()), fmt.bitmask)


def test_sparsity_config_names_the_format():
    cfg = sparsity_config(0.5, ["Linear"], ["lm_head"])
    assert cfg["format"] == FORMAT_NAME == "sparse-24-bitmask"
    assert cfg["sparsity_structure"] == "2:4"
    ct_config = pytest.importorskip("compressed_tensors.config")
    assert ct_config.Sparse24BitMaskConfig(**cfg).format == FORMAT_NAME
