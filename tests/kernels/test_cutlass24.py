"""Our sm90 2:4 GEMM library: the build's bookkeeping on any machine, every kernel against dense on a Hopper GPU."""

import pytest
import torch
import torch.nn.functional as F

from kernels import cutlass24
from kernels.backends import BackendError, CutlassSm90Backend
from kernels.sparse24 import mask_24


def test_kernel_names_are_unique_and_tiles_fit_wgmma():
    names = [k.name for k in cutlass24.KERNELS]
    assert len(set(names)) == len(names)
    for k in cutlass24.KERNELS:
        # ping-pong: one warpgroup per 64-row tile; cooperative: two warpgroups split M
        assert k.tile_m == 64 if k.pingpong else k.tile_m in (128, 256)
        assert k.tile_n % 8 == 0 and 8 <= k.tile_n <= 256
        assert not (k.stream_k and k.pingpong)  # CUTLASS's stream-K scheduler runs cooperative kernels only


def test_default_config_names_a_kernel_of_the_table():
    for tokens in (1, 16, 17, 64, 65, 8192):
        config = CutlassSm90Backend.default_config(tokens)
        kernel = cutlass24.KERNELS[config["kernel"]]
        assert kernel.tile_n >= min(tokens, 128)


def test_candidates_split_k_for_few_tokens_and_raster_for_many():
    backend = CutlassSm90Backend()
    few, many = backend.candidate_configs(16), backend.candidate_configs(4096)
    for configs in (few, many):
        assert {c["kernel"] for c in configs} == set(range(len(cutlass24.KERNELS)))
        assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)
    assert any(c.get("splits", 1) > 1 for c in few) and not any(c.get("splits", 1) > 1 for c in many)
    assert not any("raster" in c for c in few) and any("raster" in c for c in many)
    for config in few + many:
        kernel = cutlass24.KERNELS[config["kernel"]]
        assert kernel.stream_k or "splits" not in config
        assert not kernel.stream_k or "raster" not in config


def test_schedule_reads_a_plan_config():
    assert cutlass24.Schedule.of({"kernel": 2, "raster": 1, "swizzle": 8}) == cutlass24.Schedule(1, 0, 1, 8)
    assert cutlass24.Schedule.of({}) == cutlass24.Schedule()


def test_missing_headers_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    monkeypatch.setattr(cutlass24.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cutlass24.Cutlass24Error, match="nvidia-cutlass"):
        cutlass24.find_cutlass()


def test_library_key_follows_the_kernel_table(monkeypatch, tmp_path):
    include = tmp_path / "include" / "cutlass"
    include.mkdir(parents=True)
    (include / "version.h").write_text("#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 2\n#define CUTLASS_PATCH 0\n")
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    monkeypatch.setattr(cutlass24, "find_nvcc", lambda: ("nvcc", "release 13.0"))
    assert cutlass24.find_cutlass()[1] == "4.2.0"
    key, _, _ = cutlass24.library_key()
    assert key == cutlass24.library_key()[0]
    assert key != cutlass24.library_key(cutlass24.KERNELS[:-1])[0]


def test_a_kernel_and_the_compressor_compile_for_sm90a(tmp_path):
    """Catches template and API drift on machines with nvcc and no GPU (CI); the GPU tests run the rest."""
    try:
        includes, _ = cutlass24.find_cutlass()
        nvcc, _ = cutlass24.find_nvcc()
    except cutlass24.Cutlass24Error as error:
        pytest.skip(str(error))
    decode = next(k for k in cutlass24.KERNELS if k.stream_k and k.tile_n == 16)
    cutlass24._compile(nvcc, includes, cutlass24._KERNEL_TU,
                       ["-DSF24_NAME=sf24_test", "-DSF24_ELEMENT=cutlass::bfloat16_t", *decode.defines()],
                       tmp_path / "kernel.o")
    cutlass24._compile(nvcc, includes, cutlass24._COMPRESS_TU,
                       ["-DSF24_NAME=sf24_ctest", "-DSF24_ELEMENT=cutlass::half_t"], tmp_path / "compress.o")
    assert (tmp_path / "kernel.o").stat().st_size > 0 and (tmp_path / "compress.o").stat().st_size > 0


def test_unavailable_without_a_hopper_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this machine has a Hopper GPU")
    ok, why = CutlassSm90Backend().available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert not ok and why


def _hopper_backend() -> CutlassSm90Backend:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend = CutlassSm90Backend()
    ok, why = backend.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    return backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 16, 200, 1024])
def test_every_kernel_and_split_matches_dense(dtype, tokens):
    backend = _hopper_backend()
    gen = torch.Generator("cuda").manual_seed(tokens)
    weight = torch.randn(384, 1024, device="cuda", dtype=dtype, generator=gen)
    mask = mask_24(weight)
    x = torch.randn(tokens, 1024, device="cuda", dtype=dtype, generator=gen)
    handle = backend.prepare(weight, mask)
    ref = F.linear(x.float(), (weight * mask).float())
    for config in backend.candidate_configs(tokens):
        y = backend.linear(x, handle, config)
        assert y.shape == (tokens, 384) and y.dtype == dtype
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{cutlass24.KERNELS[config['kernel']].name} {config}: relative error {rel:.3g}"


@pytest.mark.gpu
def test_groups_with_fewer_than_two_nonzeros_stay_exact():
    backend = _hopper_backend()
    weight = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    mask = mask_24(weight)
    mask[:, :64] = False  # whole groups of zeros
    mask[0::2, 64:128] &= torch.arange(64, device="cuda").remainder(4).eq(0)  # one non-zero per group
    x = torch.randn(32, 256, device="cuda", dtype=torch.float16)
    y = backend.linear(x, backend.prepare(weight, mask))
    ref = F.linear(x.float(), (weight * mask).float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_unsupported_shape_is_an_error_not_a_crash():
    backend = _hopper_backend()
    weight = torch.randn(64, 100, device="cuda", dtype=torch.float16)  # K not a multiple of the 2:4 chunk
    with pytest.raises((BackendError, cutlass24.Cutlass24Error)):
        handle = backend.prepare(weight, mask_24(weight))
        backend.linear(torch.randn(4, 100, device="cuda", dtype=torch.float16), handle)
    torch.cuda.synchronize()  # the context is still healthy


@pytest.mark.gpu
def test_reused_launch_parameters_follow_buffers_and_weights():
    """Calls that repeat buffers reuse cached launch parameters: results must still track the data."""
    backend = _hopper_backend()
    weights = [torch.randn(256, 512, device="cuda", dtype=torch.float16) for _ in range(2)]
    weights = [w * mask_24(w) for w in weights]
    handles = [backend.prepare(w, None) for w in weights]
    x = torch.empty(8, 512, device="cuda", dtype=torch.float16)
    for _ in range(3):
        x.normal_()  # same buffer, new contents
        for weight, handle in zip(weights, handles, strict=True):
            y = backend.linear(x, handle)
            ref = F.linear(x.float(), weight.float())
            assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
