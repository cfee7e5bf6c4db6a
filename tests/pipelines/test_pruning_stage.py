"""The prune stage end to end on the tiny Llama, and its errors for bad input (before any work)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pipelines.masks import load_masks
from pipelines.pruning.patterns import is_nm_sparse, prune_count
from pipelines.pruning.sequential import CalibrationError
from pipelines.pruning.targets import PruneConfigError
from pipelines.recipe import DataSpec, RecipeError, parse_recipe, prune_stage
from pipelines.stage import StageContext, StageError, StageInputError
from pipelines.stages.prune import run

LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.safetensors"
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "sq_norm.model.layers.0.mlp.up_proj": torch.ones(64)}, str(path),
              metadata={"num_tokens": "256", "seq_len": "32", "samples": "8"})
    return path


def _ctx(tmp_path: Path, model: Path, calibration: Path | None = None, progress=None) -> StageContext:
    inputs = {"model": model} if calibration is None else {"model": model, "calibration": calibration}
    kwargs = {"progress": progress} if progress is not None else {}
    return StageContext(workdir=tmp_path / "out", inputs=inputs, data=DataSpec(), seed=0, **kwargs)


@pytest.mark.parametrize(
    ("method", "pattern"),
    [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "4:8"), ("wanda", "unstructured"),
     ("magnitude", "2:4")],
)
def test_stage_prunes_exactly_and_writes_loadable_outputs(
    tmp_path: Path, tiny_model_dir: Path, calibration: Path, method: str, pattern: str
) -> None:
    progress = []
    spec = prune_stage(method=method, pattern=pattern, **({"sparsity": 0.5} if pattern == "unstructured" else {}))
    result = run(spec, _ctx(tmp_path, tiny_model_dir, calibration, lambda d, t, m: progress.append((d, t))))

    assert set(result.outputs) == {"model", "masks", "compressed_model", "report"}
    model = AutoModelForCausalLM.from_pretrained(result.outputs["model"])  # plain transformers
    masks = load_masks(result.outputs["masks"])
    assert len(masks) == LINEARS
    nm = spec.nm
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0), name
        if nm is None:
            assert torch.all((~mask).sum(1) == prune_count(weight.shape[1], 0.5)), name
        else:
            assert is_nm_sparse(weight, nm) and torch.all(mask.reshape(mask.shape[0], -1, nm[1]).sum(-1) == nm[0])
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)  # dense by default
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)

    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["sparsity"] == pytest.approx(0.5)
    assert metrics["peak_gpu_mem_bytes"] == 0 and metrics["prune_time_s"] > 0
    for name in masks:
        assert metrics[f"sparsity.{name}"] == pytest.approx(0.5)
        if method == "sparsegpt":  # the only method that keeps x xᵀ, from which the error is computed
            assert 0 <= metrics[f"recon_error.{name}"] < 1
        else:
            assert f"recon_error.{name}" not in metrics
        assert metrics[f"time_s.{name}"] >= 0
    assert progress[-1] == (2, 2)
    report = json.loads(result.outputs["report"].read_text())
    assert report["pruned_linears"] == LINEARS and report["method"] == method
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_stage_is_deterministic_for_a_seed(tmp_path: Path, tiny_model_dir: Path, calibration: Path) -> None:
    spec = prune_stage(method="sparsegpt", sparsity=0.6, export="none")
    first = run(spec, _ctx(tmp_path / "a", tiny_model_dir, calibration))
    second = run(spec, _ctx(tmp_path / "b", tiny_model_dir, calibration))
    a = AutoModelForCausalLM.from_pretrained(first.outputs["model"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second.outputs["model"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sparsegpt_beats_wanda_beats_magnitude_on_the_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, calibration: Path
) -> None:
    """Distance of the pruned model's logits from the dense model's, on the calibration tokens."""
    ids = load_file(str(calibration))["input_ids"]
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            spec = prune_stage(method=method, export="none")
            result = run(spec, _ctx(tmp_path / method, tiny_model_dir, calibration))
            logits = AutoModelForCausalLM.from_pretrained(result.outputs["model"])(input_ids=ids).logits
            errors[method] = float((logits - dense).square().mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_magnitude_runs_without_calibration(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = run(prune_stage(method="magnitude", sparsity=0.3, export="none"), _ctx(tmp_path, tiny_model_dir))
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["sparsity"] == pytest.approx(prune_count(64, 0.3) / 64, abs=0.02)
    assert not any(name.startswith("recon_error.") for name in metrics)


def test_magnitude_never_reads_calibration_even_when_given(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A calibrate stage before magnitude costs the prune stage nothing: the tokens are not even read
    (these ids are outside the vocabulary, which reading them would refuse)."""
    path = tmp_path / "big.safetensors"
    save_file({"input_ids": torch.full((2, 8), 10_000, dtype=torch.long)}, str(path))
    result = run(prune_stage(method="magnitude", pattern="2:4", export="none"), _ctx(tmp_path, tiny_model_dir, path))
    assert {m.name: m.value for m in result.metrics}["sparsity"] == pytest.approx(0.5)


def test_wanda_without_calibration_names_the_missing_artifact(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(StageInputError, match="calibration"):
        run(prune_stage(method="wanda"), _ctx(tmp_path, tiny_model_dir))


def test_target_pattern_matching_nothing_names_the_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = prune_stage(method="magnitude", targets=[r"re:.*\.mlp\.\w+_proj$", "attn.qkv_proj"])
    with pytest.raises(PruneConfigError, match=r"targets\.1: pattern 'attn.qkv_proj' matches no Linear"):
        run(spec, _ctx(tmp_path, tiny_model_dir))


def test_everything_ignored_is_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = prune_stage(method="magnitude", targets=["re:.*mlp.*"], ignore=["re:.*"])
    with pytest.raises(PruneConfigError, match="targets"):
        run(spec, _ctx(tmp_path, tiny_model_dir))


def test_lm_head_as_target_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = prune_stage(method="magnitude", targets=["lm_head"], ignore=[])
    with pytest.raises(PruneConfigError, match="outside the decoder layers"):
        run(spec, _ctx(tmp_path, tiny_model_dir))


def test_m_not_dividing_the_input_dim_names_pattern(tmp_path: Path, tiny_model_dir: Path, calibration: Path) -> None:
    with pytest.raises(PruneConfigError, match=r"pattern: M=5 of '3:5' does not divide the input dimension 64"):
        run(prune_stage(method="sparsegpt", pattern="3:5"), _ctx(tmp_path, tiny_model_dir, calibration))
    assert not (tmp_path / "out" / "model").exists()


def test_empty_calibration_names_the_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_file({"input_ids": torch.zeros(0, 32, dtype=torch.long)}, str(path))
    with pytest.raises(CalibrationError, match="calibration: input_ids is empty"):
        run(prune_stage(method="wanda"), _ctx(tmp_path, tiny_model_dir, path))


def test_calibration_without_input_ids_is_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"tokens": torch.zeros(2, 8, dtype=torch.long)}, str(path))
    with pytest.raises(CalibrationError, match="no 'input_ids'"):
        run(prune_stage(method="wanda"), _ctx(tmp_path, tiny_model_dir, path))


def test_token_ids_outside_the_vocabulary_are_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"input_ids": torch.full((2, 8), 10_000, dtype=torch.long)}, str(path))
    with pytest.raises(CalibrationError, match="outside"):
        run(prune_stage(method="sparsegpt"), _ctx(tmp_path, tiny_model_dir, path))


def test_errors_are_stage_errors_and_value_errors() -> None:
    assert issubclass(PruneConfigError, StageError) and issubclass(PruneConfigError, ValueError)
    assert issubclass(CalibrationError, StageError) and issubclass(CalibrationError, ValueError)


@pytest.mark.parametrize(
    ("prune", "field"),
    [({"sparsity": 1.0}, "stages.1.prune.sparsity"), ({"sparsity": -0.1}, "stages.1.prune.sparsity"),
     ({"pattern": "4:4"}, "stages.1.prune.pattern"), ({"pattern": "4:2"}, "stages.1.prune.pattern"),
     ({"profile": "owl", "sparsity": 0.95, "owl_lambda": 0.1}, "owl_lambda"),
     ({"export": "sparse-24-bitmask", "pattern": "4:8"}, "export"), ({"bogus": 1}, "bogus")],
)
def test_recipe_rejects_bad_prune_specs_naming_the_field(prune: dict, field: str) -> None:
    recipe = {"stages": [{"stage": "calibrate"}, {"stage": "prune", "method": "sparsegpt", **prune}]}
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        parse_recipe(recipe)


def test_within_layer_calibration_defaults_per_method_and_pattern() -> None:
    assert prune_stage(method="sparsegpt").calibrate_within_layer
    assert prune_stage(method="sparsegpt", pattern="2:4").calibrate_within_layer
    assert prune_stage(method="wanda").calibrate_within_layer  # unstructured
    assert prune_stage(method="wanda", profile="owl").calibrate_within_layer
    assert not prune_stage(method="wanda", pattern="2:4").calibrate_within_layer
    assert not prune_stage(method="wanda", pattern="4:8").calibrate_within_layer
    assert not hasattr(prune_stage(method="magnitude"), "calibrate_within_layer")
    assert prune_stage(method="wanda", pattern="2:4", within_layer=True).calibrate_within_layer
    assert not prune_stage(method="wanda", within_layer=False).calibrate_within_layer
    assert not prune_stage(method="sparsegpt", within_layer=False).calibrate_within_layer


def test_act_order_defaults_on_for_nm_only() -> None:
    assert prune_stage(method="sparsegpt", pattern="2:4").use_act_order
    assert not prune_stage(method="sparsegpt").use_act_order
    assert prune_stage(method="sparsegpt", act_order=True).use_act_order
