"""FP8 E4M3 arithmetic and the FP8 kernels: the math on any machine, every kernel against the dequantized
reference on a GPU (FP8 2:4 on Hopper), and the plan routing FP8 only to quantized layers."""

import pytest
import torch
import torch.nn.functional as F

from kernels import cutlass24
from kernels.autotune import TuneTarget, shape_key
from kernels.backends import BackendError, make_backends
from kernels.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Scales,
    dequantize,
    quantize_rows,
    quantize_rows_reference,
    quantize_weight,
    reference_linear,
)
from kernels.fp8_backends import CutlassSm90Fp8Backend, DenseFp8Backend, fp8_codes
from kernels.plan import KernelChoice, KernelPlan, ShapePlan, apply_plan, environment_of
from kernels.sparse24 import mask_24


def test_row_quantization_uses_the_whole_range_and_keeps_zeros():
    w = torch.randn(64, 128) * torch.linspace(0.01, 10, 64).unsqueeze(1)
    w = w * mask_24(w)
    w[3] = 0.0  # an all-zero row
    codes, scales = quantize_weight(w)
    assert codes.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (64,)
    assert torch.equal(codes.float().abs().amax(1)[w.abs().amax(1) > 0], torch.full((63,), FP8_MAX))
    assert torch.equal(codes.float() == 0, w == 0), "the 2:4 zeros must stay zeros, and nothing else may become one"
    deq = dequantize(codes, scales)
    rel = (deq - w).abs() / w.abs().amax(1, keepdim=True).clamp(min=1e-12)
    assert rel.max() <= 2**-4 + 1e-6  # half an e4m3 step at the top of the range


def test_codes_are_recovered_exactly_from_a_bf16_dequantized_weight():
    w = torch.randn(96, 256)
    codes, scales = quantize_weight(w)
    stored = dequantize(codes, scales, torch.bfloat16)  # what the quantize stage writes
    again, _ = fp8_codes(stored, scales)
    assert torch.equal(again.view(torch.uint8), codes.view(torch.uint8))
    with pytest.raises(BackendError, match="scales"):
        fp8_codes(stored, None)
    with pytest.raises(BackendError, match="entries"):
        fp8_codes(stored, scales[:5])


def test_reference_linear_is_the_dequantized_product():
    x, w = torch.randn(7, 64), torch.randn(32, 64)
    wq, ws = quantize_weight(w)
    xq, xs = quantize_rows_reference(x)
    expected = dequantize(xq, xs) @ dequantize(wq, ws).t()
    torch.testing.assert_close(reference_linear(x, wq, ws), expected, rtol=1e-5, atol=1e-5)
    # and close to the unquantized product: FP8 keeps about 2 significant digits per element
    full = x @ w.t()
    assert ((reference_linear(x, wq, ws) - full).norm() / full.norm()) < 0.05


def test_shape_keys_of_quantized_layers_are_their_own():
    assert shape_key(4096, 14336) == "4096x14336"
    assert shape_key(4096, 14336, fp8=True) == "4096x14336:fp8"
    assert shape_key(4096, 14336, fp8=True, sparse=False) == "4096x14336:fp8-dense"


def test_fp8_choices_apply_only_to_quantized_layers():
    """A plan whose `:fp8` shape names an FP8 kernel swaps only the layers given FP8 scales."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False))
    choice = {1: KernelChoice(backend="dense-fp8", reason="test")}
    plan = KernelPlan(environment=environment_of(None), dtype="bfloat16", tokens=[1],
                      shapes={"32x64:fp8-dense": ShapePlan(out_features=32, in_features=64, choices=choice)})
    model = model.to(torch.bfloat16)
    scales = {"0": quantize_weight(model[0].weight.float())[1]}

    class CpuFp8(DenseFp8Backend):
        def available(self, device):
            return True, ""

    report = apply_plan(model, plan, backends={"dense-fp8": CpuFp8(), "dense": make_backends(["dense"])["dense"]},
                        check_env=False, fp8_scales=scales)
    assert report.replaced == {"0": "32x64:fp8-dense"}  # quantized, not 2:4
    assert isinstance(model[1], torch.nn.Linear)


def test_unpruned_quantized_layer_is_a_dense_only_target():
    target = TuneTarget(torch.randn(8, 16), None, torch.ones(8), sparse=False)
    assert target.mask is None and not target.sparse


def test_fp8_kernels_compile_for_sm90a(tmp_path):
    """The FP8 GEMM and the e4m3 compressor compile (template or API drift shows here, on machines with nvcc)."""
    try:
        includes, _ = cutlass24.find_cutlass()
        nvcc, _ = cutlass24.find_nvcc()
    except cutlass24.Cutlass24Error as error:
        pytest.skip(str(error))
    decode = next(k for k in cutlass24.KERNELS if k.stream_k and k.tile_n == 16)
    cutlass24._compile(nvcc, includes, cutlass24._FP8_KERNEL_TU, ["-DSF24_NAME=sf24_fp8test", *decode.defines()],
                       tmp_path / "kernel.o")
    cutlass24._compile(nvcc, includes, cutlass24._COMPRESS_TU, ["-DSF24_NAME=sf24_c8", "-DSF24_FP8=1"],
                       tmp_path / "compress.o")
    assert (tmp_path / "kernel.o").stat().st_size > 0 and (tmp_path / "compress.o").stat().st_size > 0


def _gpu(backend_cls, capability=(8, 9)):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend = backend_cls()
    ok, why = backend.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    return backend


def _layer(out_f: int, in_f: int, seed: int, sparse: bool = True):
    gen = torch.Generator("cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = mask_24(w) if sparse else None
    codes, scale = quantize_weight(w * mask if sparse else w)
    return dequantize(codes, scale, torch.bfloat16), mask, scale, codes


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 64, 1000])
@pytest.mark.parametrize("k", [256, 4096, 14336])
def test_fused_row_quantization_matches_the_reference(tokens, k):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) * 3
    x[0, :5] = 0
    from kernels.cutlass24 import Cutlass24Error, find_nvcc
    from kernels.fp8 import _cuda_quantizer

    try:
        find_nvcc()
    except Cutlass24Error:
        pass
    else:
        assert _cuda_quantizer() is not None, "with nvcc at hand the CUDA kernel is built and used"
    codes, scales = quantize_rows(x)
    ref_codes, ref_scales = quantize_rows_reference(x)
    # both divide (see row_scales): a code may still differ by one step where x / scale is within a rounding
    # error of a tie between two codes
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    same_sign = (codes.float() * ref_codes.float() >= 0).all()
    steps = (codes.view(torch.uint8).int() & 0x7F) - (ref_codes.view(torch.uint8).int() & 0x7F)
    assert same_sign and steps.abs().max() <= 1
    assert (steps != 0).float().mean() < 1e-3
    static = torch.tensor(2.0 / FP8_MAX, device="cuda")
    codes, scales = quantize_rows(x, static)
    ref_codes, ref_scales = quantize_rows_reference(x, static)
    assert torch.equal(scales, ref_scales) and torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("tokens", [1, 17, 512])
def test_dense_fp8_matches_the_dequantized_reference(tokens, static):
    backend = _gpu(DenseFp8Backend)
    weight, _, scale, codes = _layer(512, 1024, tokens, sparse=False)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    input_scale = torch.tensor(4.0 / FP8_MAX, device="cuda") if static else None
    y = backend.linear(x, backend.prepare(weight, None, scale=Fp8Scales(scale, input_scale)))
    ref = reference_linear(x, codes, scale, input_scale)
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 16, 200, 1024])
def test_every_fp8_24_kernel_and_split_matches_the_dequantized_reference(tokens):
    backend = _gpu(CutlassSm90Fp8Backend)
    weight, mask, scale, codes = _layer(384, 1024, tokens)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    handle = backend.prepare(weight, mask, scale=scale)
    ref = reference_linear(x, codes, scale)
    static = torch.tensor(3.0 / FP8_MAX, device="cuda")
    y = backend.linear(x, backend.prepare(weight, mask, scale=Fp8Scales(scale, static)))
    ref_static = reference_linear(x, codes, scale, static)
    assert ((y.float() - ref_static).norm() / ref_static.norm()) < 1e-2, "static activation scale"
    for config in backend.candidate_configs(tokens):
        y = backend.linear(x, handle, config)
        assert y.shape == (tokens, 384) and y.dtype == torch.bfloat16
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{cutlass24.KERNELS[config['kernel']].name} {config}: relative error {rel:.3g}"


@pytest.mark.gpu
def test_tuned_fp8_layer_runs_an_fp8_kernel_where_it_wins():
    from kernels.autotune import TuneSettings, tune

    backend = _gpu(CutlassSm90Fp8Backend)
    del backend
    weight, mask, scale, codes = _layer(4096, 4096, 0)
    settings = TuneSettings(tokens=(1, 4096), dtype=torch.bfloat16, repeats=10, search_configs=False,
                            backends=("dense", "cutlass-sm90", "dense-fp8", "cutlass-sm90-fp8"))
    tuned = tune({"4096x4096:fp8": TuneTarget(weight, mask, scale)}, settings, torch.device("cuda"))
    choice = tuned["4096x4096:fp8"][4096]
    assert choice["backend"] in ("dense-fp8", "cutlass-sm90-fp8"), choice
    assert set(choice["times_ms"]) >= {"dense", "dense-fp8", "cutlass-sm90-fp8"}
    plain = tune({"4096x4096": TuneTarget(weight, mask)}, settings, torch.device("cuda"))["4096x4096"][4096]
    assert not any(name.endswith("fp8") for name in plain["times_ms"]), "an unquantized layer never runs FP8"
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    ref = reference_linear(x, codes, scale)
    linear = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    from kernels.plan import SparseLinear

    module = SparseLinear(linear, mask, {4096: KernelChoice(**choice)}, make_backends([choice["backend"], "dense"]),
                          scale)
    y = module(x)
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert F.linear(x, weight).shape == y.shape


@pytest.mark.gpu
def test_use_fp8_gemms_runs_quantized_layers_in_fp8():
    from kernels.fp8_backends import use_fp8_gemms

    _gpu(DenseFp8Backend)
    weight, _, scale, codes = _layer(256, 512, 3, sparse=False)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False), torch.nn.Linear(256, 64, bias=False))
    model = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    assert use_fp8_gemms(model, {"0": scale}) == 1
    x = torch.randn(9, 512, device="cuda", dtype=torch.bfloat16)
    ref = reference_linear(x, codes, scale)
    assert ((model[0](x).float() - ref).norm() / ref.norm()) < 1e-2
    assert isinstance(model[1], torch.nn.Linear)
