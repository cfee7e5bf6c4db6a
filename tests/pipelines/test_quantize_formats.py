"""FP8 E4M3 formats: scales, codes, zeros, exact code recovery from stored weights, emulation, sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.quantize import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Layer,
    Fp8SidecarError,
    dequantize_weight,
    fp8_codes,
    fp8_linear_reference,
    is_fp8_model,
    per_token_scales,
    quantize_activation,
    quantize_weight,
    read_fp8_layers,
    weight_scales,
)
from pipelines.quantize.apply import quantize_linears
from pipelines.quantize.emulate import Fp8EmulatedLinear, attach_emulation, detach_emulation
from pipelines.quantize.fp8 import Fp8Error
from pipelines.quantize.sidecar import SIDECAR_NAME, write_fp8_layers


def _pruned_24(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    groups = weight.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(rows, cols)


def _u8(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8)


def test_weight_scales_map_each_row_max_to_448_and_guard_zero_rows() -> None:
    weight = _pruned_24(8, 16)
    weight[3] = 0
    scale = weight_scales(weight)
    assert scale.dtype == torch.float32 and scale.shape == (8,)
    assert scale[3] == 1.0
    codes = quantize_weight(weight, scale)
    assert codes.dtype == FP8_DTYPE
    row_max = codes.float().abs().amax(1)
    assert torch.all(row_max[[0, 1, 2, 4, 5, 6, 7]] == FP8_MAX) and row_max[3] == 0
    assert not torch.isnan(codes.float()).any()


def test_zero_maps_to_code_zero_and_back_to_exact_zero() -> None:
    weight = _pruned_24(32, 64)
    scale = weight_scales(weight)
    codes = quantize_weight(weight, scale)
    zero = weight == 0
    assert torch.all(_u8(codes)[zero] == 0)  # +0.0, not -0.0 or a subnormal
    dequantized = dequantize_weight(codes, scale, torch.bfloat16)
    assert torch.all(dequantized[zero] == 0)
    groups = dequantized.reshape(32, 16, 4).ne(0).sum(-1)
    assert int(groups.max()) <= 2  # still 2:4


def test_values_beyond_the_scale_saturate_instead_of_nan() -> None:
    x = torch.tensor([[1.0, -2.0, 1000.0]])
    codes, scale = quantize_activation(x, torch.tensor(1.0))
    assert codes.float().tolist() == [[1.0, -2.0, 448.0]] and float(scale) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_codes_recovers_exact_codes_from_stored_weight(dtype: torch.dtype) -> None:
    weight = _pruned_24(64, 128, seed=1)
    weight[0, 0] = 1e-7  # far below the row's smallest step: rounds to code 0
    scale = weight_scales(weight, dtype)
    codes = quantize_weight(weight, scale)
    stored = dequantize_weight(codes, scale, dtype)
    assert stored.dtype == dtype
    assert torch.equal(_u8(fp8_codes(stored, scale)), _u8(codes))
    # every E4M3 value (both signs, subnormals included) survives a round trip at an arbitrary scale
    every = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE)
    every = every[~torch.isnan(every.float())].reshape(1, -1)
    odd_scale = torch.tensor([0.0123456789]).to(dtype).float()
    again = fp8_codes(dequantize_weight(every, odd_scale, dtype), odd_scale)
    assert torch.equal(_u8(again), _u8(every).where(every.float() != 0, 0))  # -0 comes back as +0


def test_scales_are_representable_in_the_storage_dtype() -> None:
    scale = weight_scales(_pruned_24(16, 32), torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())


def test_non_finite_weights_are_refused() -> None:
    weight = torch.ones(2, 4)
    weight[1, 2] = float("nan")
    with pytest.raises(Fp8Error, match="non-finite"):
        weight_scales(weight)


def test_per_token_scales_and_reference_matches_dequantized_matmul() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 64, generator=gen)
    x[1, 2] = 0  # a zero token: scale 1, codes 0, output bias only
    weight = _pruned_24(32, 64, seed=3)
    bias = torch.randn(32, generator=gen)
    scale = weight_scales(weight)
    codes = quantize_weight(weight, scale)
    sx = per_token_scales(x)
    assert sx.shape == (3, 5, 1) and float(sx[1, 2]) == 1.0
    assert torch.allclose(sx[0, 0, 0], x[0, 0].abs().max() / 448)
    out = fp8_linear_reference(x, codes, scale, bias)
    x_codes, _ = quantize_activation(x)
    expect = (x_codes.double() * sx.double()) @ (codes.double() * scale.double()[:, None]).T + bias.double()
    assert torch.allclose(out.double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1, 2], bias)
    # and it is close to the unquantized layer (FP8 has ~2^-4 relative steps)
    exact = torch.nn.functional.linear(x, weight, bias)
    assert (out - exact).norm() / exact.norm() < 0.05


def test_emulated_linear_swaps_in_and_out_keeping_parameters() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    layers, outcomes = quantize_linears({"0": model[0], "2": model[2]}, torch.float32)
    assert all(o.zeros_preserved and o.codes_recoverable for o in outcomes)
    weights = [model[0].weight, model[2].weight]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 16)
    plain = model(x)
    assert attach_emulation(model, layers) == 2
    assert isinstance(model[0], Fp8EmulatedLinear) and model[0].weight is weights[0]
    assert set(model.state_dict()) == set(state)  # buffers are not persistent
    emulated = model(x)
    assert not torch.equal(plain, emulated)  # activations are rounded now
    assert torch.allclose(plain, emulated, rtol=0.1, atol=0.05)
    assert detach_emulation(model) == 2
    assert type(model[0]) is nn.Linear and model[0].weight is weights[0]
    assert torch.equal(model(x), plain)


def test_sidecar_round_trip_and_errors(tmp_path: Path) -> None:
    layers = {
        "a.q_proj": Fp8Layer(torch.rand(8) + 0.1, torch.tensor(0.5), "static"),
        "a.k_proj": Fp8Layer(torch.rand(4) + 0.1, torch.tensor(0.25), "static"),
    }
    assert not is_fp8_model(tmp_path)
    write_fp8_layers(tmp_path, layers)
    assert is_fp8_model(tmp_path)
    back = read_fp8_layers(tmp_path)
    assert set(back) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(back[name].weight_scale, layer.weight_scale)
        assert back[name].input_scale.shape == () and float(back[name].input_scale) == float(layer.input_scale)
        assert back[name].activations == "static"
    with pytest.raises(Fp8SidecarError, match="input_scale must be given exactly"):
        write_fp8_layers(tmp_path, {"x": Fp8Layer(torch.ones(2), torch.tensor(1.0), "dynamic")})
    with pytest.raises(Fp8SidecarError, match="scheme"):
        write_fp8_layers(tmp_path, layers, scheme="int8")
    (tmp_path / SIDECAR_NAME).write_bytes(b"not safetensors")
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error type)
        read_fp8_layers(tmp_path)
    with pytest.raises(Fp8SidecarError, match="not an FP8 model folder"):
        read_fp8_layers(tmp_path / "missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_emulation_on_cuda_matches_cpu_and_a_real_fp8_gemm() -> None:
    """The emulation is device-independent, and equals torch._scaled_mm (per-token x per-channel) on FP8 GPUs."""
    linear = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_pruned_24(128, 256, seed=4))
    layers, _ = quantize_linears({"l": linear}, torch.bfloat16)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    cpu = Fp8EmulatedLinear(linear, layers["l"])(x)
    gpu_linear = nn.Linear(256, 128, bias=False).cuda()
    with torch.no_grad():
        gpu_linear.weight.copy_(linear.weight)
    emulated = Fp8EmulatedLinear(gpu_linear, layers["l"])
    gpu = emulated(x.cuda())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    stored = gpu_linear.weight.detach().to(torch.bfloat16)  # as a kernel tuner holds it: on the GPU, scales on the CPU
    assert torch.equal(fp8_codes(stored, layers["l"].weight_scale).cpu().view(torch.uint8),
                       quantize_weight(linear.weight, layers["l"].weight_scale).view(torch.uint8))
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores: the real-GEMM comparison needs sm89 or newer")
    x_codes, x_scale = quantize_activation(x.cuda())
    w_codes = emulated.weight_codes.to(FP8_DTYPE)
    real = torch._scaled_mm(x_codes, w_codes.t(), scale_a=x_scale.reshape(-1, 1).float(),
                            scale_b=emulated.weight_scale.reshape(1, -1).float(), out_dtype=torch.bfloat16)
    assert torch.allclose(real.float(), gpu.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_gptq_rounding_keeps_zeros_stays_on_the_grid_and_beats_nearest_on_its_data() -> None:
    from pipelines.quantize.gptq import gptq_fp8

    gen = torch.Generator().manual_seed(7)
    # anisotropic, correlated inputs (as LLM activations are): a few strong directions
    x = torch.randn(2048, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) * torch.logspace(0, -2, 64))
    weight = _pruned_24(32, 64, seed=8)
    scale = weight_scales(weight)
    nearest = dequantize_weight(quantize_weight(weight, scale), scale)
    rounded, damping = gptq_fp8(weight, x.T @ x, scale, block_size=16)
    assert damping == 0.01
    assert torch.all(rounded[weight == 0] == 0)
    assert torch.equal(dequantize_weight(fp8_codes(rounded, scale), scale), rounded)  # on the E4M3 grid
    err_nearest = (x @ (nearest - weight).T).norm()
    err_gptq = (x @ (rounded - weight).T).norm()
    assert err_gptq < 0.9 * err_nearest


def test_gptq_act_order_rounds_strong_inputs_first_keeping_zeros_and_grid() -> None:
    from pipelines.quantize.gptq import gptq_fp8

    gen = torch.Generator().manual_seed(11)
    # input energy spread unevenly and out of column order: act-order visits the strong columns first
    energy = torch.logspace(1, -2, 64)[torch.randperm(64, generator=gen)]
    x = (torch.randn(4096, 64, generator=gen) * energy) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=gen))
    weight = _pruned_24(48, 64, seed=12)
    scale = weight_scales(weight)
    hessian = x.T @ x
    plain, _ = gptq_fp8(weight, hessian, scale, block_size=16)
    ordered, _ = gptq_fp8(weight, hessian, scale, block_size=16, act_order=True)
    assert torch.all(ordered[weight == 0] == 0)
    assert torch.equal(dequantize_weight(fp8_codes(ordered, scale), scale), ordered)
    # the permutation is undone: act_order over an already sorted Hessian is plain GPTQ
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    sorted_plain, _ = gptq_fp8(weight[:, order], hessian[order][:, order], scale, block_size=16)
    assert torch.equal(ordered[:, order], sorted_plain)
    assert not torch.equal(ordered, plain)
    err_plain = (x @ (plain - weight).T).norm()
    err_ordered = (x @ (ordered - weight).T).norm()
    assert err_ordered < err_plain
