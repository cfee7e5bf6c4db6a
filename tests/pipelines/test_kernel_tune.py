"""Stage `kernel_tune` without a GPU: a plan that is dense everywhere, says why, and times nothing.

The kernel cache tests simulate a GPU (environment and tuner replaced) to check which shapes are timed.
"""

import json
from pathlib import Path

import pytest
import torch

from kernels.plan import Environment, apply_plan, load_plan
from kernels.sparse24 import mask_24
from pipelines.modelio import load_model
from pipelines.recipe import DataSpec, KernelTuneStage
from pipelines.stage import StageContext, StageInputError
from pipelines.stages import kernel_tune
from pipelines.stages.kernel_tune import NO_GPU, KernelCache, find_24_linears, run

PRUNED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
          "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def pruned_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with four decoder Linears pruned 2:4 by magnitude; the rest stay dense."""
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for name in PRUNED:
            weight = model.get_submodule(name).weight
            weight.mul_(mask_24(weight))
    out = tmp_path_factory.mktemp("pruned_24")
    model.save_pretrained(out, safe_serialization=True)
    return out


def _ctx(tmp_path: Path, model_dir: Path, device: str = "cpu") -> StageContext:
    return StageContext(workdir=tmp_path, inputs={"model": model_dir}, data=DataSpec(), device=torch.device(device))


def test_find_24_linears_groups_by_shape_and_excludes_dense(pruned_model_dir):
    groups, dense = find_24_linears(load_model(pruned_model_dir))
    assert groups == {"64x64": ["model.layers.0.self_attn.q_proj"],
                      "128x64": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
                      "64x128": ["model.layers.1.mlp.down_proj"]}
    assert "model.layers.0.mlp.down_proj" in dense and "lm_head" not in dense


def test_cpu_run_writes_a_dense_plan_with_reason(pruned_model_dir, tmp_path):
    spec = KernelTuneStage(tokens=[1, 16, 2048])
    result = run(spec, _ctx(tmp_path, pruned_model_dir))
    path = result.outputs["kernel_plan"]
    assert path == tmp_path / "kernel_plan.json"
    plan = load_plan(path)
    assert plan.dtype == "float16" and plan.tokens == [1, 16, 2048]
    assert plan.environment.gpu is None and plan.environment.torch == torch.__version__
    assert set(plan.shapes) == {"64x64", "128x64", "64x128"}
    assert plan.shapes["128x64"].layers == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    for shape in plan.shapes.values():
        assert sorted(shape.choices) == [1, 16, 2048]
        for choice in shape.choices.values():
            assert choice.backend == "dense" and choice.reason == NO_GPU
            assert choice.times_ms == {} and choice.speedup is None  # never a fake timing
    assert plan.sparse_shapes() == {}


def test_cpu_run_notes_and_metrics_say_tuning_was_skipped(pruned_model_dir, tmp_path):
    result = run(KernelTuneStage(), _ctx(tmp_path, pruned_model_dir))
    assert any("skipped" in n and NO_GPU in n for n in result.notes)
    assert {m.name: m.value for m in result.metrics} == {"kernel_tuned_shapes": 0.0, "kernel_cached_shapes": 0.0}
    assert result.summary["sparse_24_linears"] == 4
    assert result.summary["dense_linears"] == 10  # 2 layers x 7 Linears, 4 of them pruned


def test_cuda_device_without_cuda_falls_back_to_the_dense_plan(pruned_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run(KernelTuneStage(tokens=[1]), _ctx(tmp_path, pruned_model_dir, "cuda"))
    assert any(NO_GPU in n for n in result.notes)
    assert {c.backend for s in load_plan(result.outputs["kernel_plan"]).shapes.values() for c in s.choices.values()} \
        == {"dense"}


def test_dense_plan_applies_as_a_no_op(pruned_model_dir, tmp_path):
    result = run(KernelTuneStage(tokens=[1]), _ctx(tmp_path, pruned_model_dir))
    model = load_model(pruned_model_dir, dtype=torch.float16)
    report = apply_plan(model, load_plan(result.outputs["kernel_plan"]))
    assert report.replaced == {}
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_unpruned_model_gives_an_empty_plan_and_says_so(tiny_model_dir, tmp_path):
    result = run(KernelTuneStage(tokens=[1]), _ctx(tmp_path, tiny_model_dir))
    assert load_plan(result.outputs["kernel_plan"]).shapes == {}
    assert any("no decoder Linear follows 2:4" in n for n in result.notes)


def test_missing_model_input_is_a_clear_error(tmp_path):
    ctx = StageContext(workdir=tmp_path, inputs={}, data=DataSpec())
    with pytest.raises(StageInputError, match="'model'"):
        run(KernelTuneStage(), ctx)


H100 = Environment(gpu="NVIDIA H100 80GB HBM3", capability="9.0", cuda="13.0", driver="580.159.04",
                   torch="2.11.0+cu130", cusparselt=800)
CACHED = {"backend": "cusparselt-planned", "config": {"layout": 1, "alg_id": 7}, "speedup": 1.4,
          "times_ms": {"dense": 1.4, "cusparselt-planned": 1.0}, "reason": "fastest"}


@pytest.fixture
def fake_gpu(monkeypatch) -> list[set[str]]:
    """A CUDA device that is an H100 to the stage; the tuner records the shapes it was asked to time."""
    calls: list[set[str]] = []

    def fake_tune(weights, settings, device, progress=None):
        calls.append(set(weights))
        return {key: {t: {"backend": "dense", "times_ms": {"dense": 0.01}, "speedup": 1.0, "reason": "timed"}
                      for t in settings.tokens} for key in weights}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel_tune, "environment_of", lambda device: H100)
    monkeypatch.setattr(kernel_tune, "tune", fake_tune)
    return calls


def _cache(path: Path, entries: list[tuple[Environment, str, str, int]]) -> Path:
    cache = KernelCache(entries=[{"environment": env, "dtype": dtype, "shape": shape, "tokens": t, "choice": CACHED}
                                 for env, dtype, shape, t in entries])
    path.write_text(json.dumps(cache.model_dump(mode="json")))
    return path


def test_fully_cached_shape_is_reused_without_timing(pruned_model_dir, tmp_path, fake_gpu):
    cache = _cache(tmp_path / "cache.json", [(H100, "float16", "128x64", 1), (H100, "float16", "128x64", 16),
                                             (H100, "float16", "64x64", 1)])  # 64x64 lacks 16 tokens
    ctx = _ctx(tmp_path / "work", pruned_model_dir, "cuda")
    ctx.inputs["kernel_cache"] = cache
    result = run(KernelTuneStage(tokens=[1, 16]), ctx)
    assert fake_gpu == [{"64x64", "64x128"}]  # the partly cached shape is tuned again
    plan = load_plan(result.outputs["kernel_plan"])
    assert set(plan.shapes) == {"64x64", "128x64", "64x128"}
    assert {t: c.backend for t, c in plan.shapes["128x64"].choices.items()} == {1: "cusparselt-planned",
                                                                                16: "cusparselt-planned"}
    assert plan.shapes["128x64"].choices[16].config == {"layout": 1, "alg_id": 7}
    assert plan.shapes["128x64"].layers == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert plan.shapes["64x64"].choices[1].reason == "timed"
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["kernel_cached_shapes"] == 1.0 and metrics["kernel_tuned_shapes"] == 2.0
    assert any("reused 1 cached shape(s)" in n for n in result.notes)


def test_cache_of_another_environment_or_dtype_is_not_used(pruned_model_dir, tmp_path, fake_gpu):
    other = H100.model_copy(update={"driver": "570.86.15"})
    cache = _cache(tmp_path / "cache.json", [(other, "float16", "64x64", 1), (H100, "bfloat16", "128x64", 1)])
    ctx = _ctx(tmp_path / "work", pruned_model_dir, "cuda")
    ctx.inputs["kernel_cache"] = cache
    result = run(KernelTuneStage(tokens=[1]), ctx)
    assert fake_gpu == [{"64x64", "128x64", "64x128"}]
    assert {m.name: m.value for m in result.metrics}["kernel_cached_shapes"] == 0.0


def test_everything_cached_times_nothing(pruned_model_dir, tmp_path, fake_gpu):
    cache = _cache(tmp_path / "cache.json", [(H100, "float16", s, 1) for s in ("64x64", "128x64", "64x128")])
    ctx = _ctx(tmp_path / "work", pruned_model_dir, "cuda")
    ctx.inputs["kernel_cache"] = cache
    result = run(KernelTuneStage(tokens=[1]), ctx)
    assert fake_gpu == []
    assert len(load_plan(result.outputs["kernel_plan"]).sparse_shapes()) == 3


def test_invalid_kernel_cache_is_a_clear_error(pruned_model_dir, tmp_path, fake_gpu):
    bad = tmp_path / "cache.json"
    bad.write_text(json.dumps({"format": "sparseflow.kernel_cache", "entries": [{"shape": "64x64"}]}))
    ctx = _ctx(tmp_path / "work", pruned_model_dir, "cuda")
    ctx.inputs["kernel_cache"] = bad
    with pytest.raises(StageInputError, match="kernel_cache .*entries.0.environment"):
        run(KernelTuneStage(tokens=[1]), ctx)


@pytest.fixture(scope="module")
def fp8_model_dir(pruned_model_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The partly 2:4 tiny Llama with every decoder Linear quantized to FP8 by the quantize stage."""
    import shutil

    from pipelines.recipe import QuantizeStage
    from pipelines.stages import quantize

    work = tmp_path_factory.mktemp("fp8")
    source = shutil.copytree(pruned_model_dir, work / "pruned")
    for tokenizer_file in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, source / tokenizer_file.name)
    return quantize.run(QuantizeStage(export="none"), _ctx(work / "q", source)).outputs["model"]


def test_quantized_linears_are_tuned_under_their_own_fp8_keys(fp8_model_dir, tmp_path, monkeypatch):
    """Every quantized Linear is a tuning target (2:4 or not) under `<out>x<in>:fp8`, with its FP8 scales;
    the ones that are not 2:4 are marked dense-only, so no 2:4 kernel is tried on them."""
    from kernels.fp8 import Fp8Scales

    seen = {}

    def fake_tune(weights, settings, device, progress=None):
        seen.update(weights)
        return {key: {t: {"backend": "dense", "times_ms": {"dense": 0.01}, "speedup": 1.0, "reason": "timed"}
                      for t in settings.tokens} for key in weights}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel_tune, "environment_of", lambda device: H100)
    monkeypatch.setattr(kernel_tune, "tune", fake_tune)
    result = run(KernelTuneStage(tokens=[1, 16], dtype="bfloat16"), _ctx(tmp_path, fp8_model_dir, "cuda"))
    # pruned 2:4: q_proj (64x64) of layer 0, up_proj (128x64) of both layers, down_proj (64x128) of layer 1
    assert set(seen) == {"64x64:fp8", "128x64:fp8", "64x128:fp8",
                         "64x64:fp8-dense", "32x64:fp8-dense", "128x64:fp8-dense", "64x128:fp8-dense"}
    assert all(isinstance(t.fp8_scale, Fp8Scales) and t.fp8_scale.input is None for t in seen.values())
    assert all(t.sparse == (key.endswith(":fp8")) for key, t in seen.items())
    assert all((t.mask is not None) == t.sparse for t in seen.values())
    plan = load_plan(result.outputs["kernel_plan"])
    assert set(plan.shapes) == set(seen) and result.summary["fp8_linears"] == 14


def test_cpu_plan_of_an_fp8_model_is_dense_under_fp8_keys(fp8_model_dir, tmp_path):
    result = run(KernelTuneStage(tokens=[1], dtype="bfloat16"), _ctx(tmp_path, fp8_model_dir))
    plan = load_plan(result.outputs["kernel_plan"])
    assert plan.shapes and all(":fp8" in key for key in plan.shapes)
    assert all(c.backend == "dense" and c.reason == NO_GPU for s in plan.shapes.values() for c in s.choices.values())
