"""Stage `kernel_tune` without a GPU: a plan that is dense everywhere, says why, and times nothing."""

from pathlib import Path

import pytest
import torch

from kernels.plan import apply_plan, load_plan
from kernels.sparse24 import mask_24
from pipelines.modelio import load_model
from pipelines.recipe import DataSpec, KernelTuneStage
from pipelines.stage import StageContext, StageInputError
from pipelines.stages.kernel_tune import NO_GPU, find_24_linears, run

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
    assert {m.name: m.value for m in result.metrics} == {"kernel_tuned_shapes": 0.0}
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
