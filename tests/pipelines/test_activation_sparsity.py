"""Activation sparsity: thresholds, allocation, the profile stage, the exported model, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.activation.allocation import allocate, critical_sparsity
from pipelines.activation.apply import (
    ActivationSparsityError,
    ThresholdedMLP,
    gated_mlps,
    install_thresholds,
    load_activation_sparse_model,
    threshold_hooks,
)
from pipelines.activation.measure import check_restart, collect_histograms, layer_curves, perplexity_at
from pipelines.activation.stats import accumulate, fraction_below, new_histograms, threshold_for
from pipelines.data import calibration_samples, eval_windows, perplexity
from pipelines.modelio import load_model, load_tokenizer
from pipelines.recipe import ActivationProfileStage, DataSpec, RecipeError, parse_recipe
from pipelines.sources import load_text
from pipelines.stage import StageContext
from pipelines.stages.activation_profile import run


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def texts(tiny_model_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer, cache = load_tokenizer(tiny_model_dir), tmp_path_factory.mktemp("cache")
    calib = calibration_samples(tokenizer, load_text(str(tiny_text_file), "calibration", cache), 8, 64, seed=0)
    held_out = eval_windows(tokenizer, load_text(str(tiny_text_file), "evaluation", cache), 64, 4)
    return calib, held_out


def test_histogram_threshold_matches_exact_quantile() -> None:
    h = torch.randn(20_000) * torch.rand(20_000).pow(3)
    hist = new_histograms(1)[0]
    accumulate(hist, h)
    for s in (0.1, 0.5, 0.9):
        exact = torch.quantile(h.abs(), s).item()
        assert threshold_for(hist, s) == pytest.approx(exact, rel=0.01)
    assert threshold_for(hist, 0.0) == 0.0


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_thresholds_give_requested_sparsity_on_held_out_tokens(model, texts, sparsity: float) -> None:
    calib, held_out = texts
    histograms = collect_histograms(model, calib, batch_size=4)
    thresholds = [threshold_for(histograms[i], sparsity) for i in range(histograms.shape[0])]
    _, achieved = perplexity_at(model, held_out, thresholds, batch_size=4)
    assert achieved == pytest.approx([sparsity] * len(achieved), abs=0.03)


def test_sparsity_zero_reproduces_dense_logits_exactly(tiny_model_dir: Path, texts) -> None:
    _, held_out = texts
    dense = load_model(tiny_model_dir)
    patched = load_model(tiny_model_dir)
    install_thresholds(patched, [0.0, 0.0])
    with torch.inference_mode():
        assert torch.equal(patched(input_ids=held_out).logits, dense(input_ids=held_out).logits)


def test_thresholded_mlp_zeroes_small_activations(model) -> None:
    mlp = gated_mlps(model)[0]
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.inference_mode():
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        threshold = h.abs().median().item()
        expected = mlp.down_proj(torch.where(h.abs() < threshold, 0.0, h))
        got = ThresholdedMLP(mlp, threshold, use_kernel=False)(x)
    assert fraction_below(h, threshold)[0] > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_restart_and_layer_curves(model, texts) -> None:
    _, held_out = texts
    check_restart(model, held_out[:1])
    curves = layer_curves(model, held_out[:2], [[0.0, 0.05], [0.0, 0.05]], batch_size=2)
    dense = curves.dense_perplexity
    with torch.inference_mode():
        assert dense == pytest.approx(perplexity(model, held_out[:2], 2), rel=1e-5)
    assert curves.perplexity[0][0] == pytest.approx(dense, rel=1e-5)
    assert curves.perplexity[1][0] == pytest.approx(dense, rel=1e-5)
    # threshold 0 is the dense model: no divergence; a real threshold diverges
    assert curves.kl[0][0] == pytest.approx(0.0, abs=1e-6) and curves.kl[1][0] == pytest.approx(0.0, abs=1e-6)
    assert curves.kl[0][1] > 1e-6 and curves.kl[1][1] > 1e-6


def test_layer_kl_matches_a_direct_computation(model, texts) -> None:
    _, held_out = texts
    mlps = gated_mlps(model)
    batch = held_out[:2]
    curves = layer_curves(model, batch, [[0.05], [0.05]], batch_size=2)
    with torch.inference_mode():
        dense = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
        with threshold_hooks(mlps, {1: 0.05}):
            sparse = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
    expected = (dense.exp() * (dense - sparse)).sum(-1).mean()
    assert curves.kl[1][0] == pytest.approx(float(expected), rel=1e-3)


def test_critical_sparsity_interpolates_first_crossing() -> None:
    points = [(0.3, 10.0), (0.5, 10.05), (0.7, 10.3), (0.9, 12.0)]
    assert critical_sparsity(points, 10.0, 0.01) == pytest.approx(0.5 + (10.1 - 10.05) / 0.25 * 0.2)
    assert critical_sparsity(points, 10.0, 0.5) == 0.9
    assert critical_sparsity([(0.3, 11.0)], 10.0, 0.01) == pytest.approx(0.03)


KL_CURVES = [[0.001, 0.004, 0.02, 0.08], [0.01, 0.05, 0.3, 1.5], [0.0005, 0.002, 0.006, 0.02]]


@pytest.mark.parametrize("mean", [0.0, 0.37, 0.5, 0.813])
def test_allocation_keeps_the_mean_and_spares_the_sensitive_layer(mean: float) -> None:
    grid = [0.3, 0.5, 0.7, 0.9]
    alloc = allocate(KL_CURVES, grid, mean, max_deviation=1.0)
    assert sum(alloc) / len(alloc) == pytest.approx(mean, abs=1e-9)
    assert all(0.0 <= a <= 0.9 + 1e-9 for a in alloc)
    if mean >= 0.3:
        assert alloc[1] < alloc[0] <= alloc[2]
    with pytest.raises(ValueError, match="mean sparsity"):
        allocate(KL_CURVES, grid, 0.95)


def test_allocation_stays_within_the_cap_and_equal_curves_give_uniform() -> None:
    grid = [0.3, 0.5, 0.7, 0.9]
    capped = allocate(KL_CURVES, grid, 0.6, max_deviation=0.05)
    assert all(0.55 - 1e-9 <= a <= 0.65 + 1e-9 for a in capped)
    assert sum(capped) / 3 == pytest.approx(0.6)
    same = allocate([KL_CURVES[0]] * 4, grid, 0.6)
    assert same == pytest.approx([0.6] * 4, abs=0.011)


def test_allocation_minimizes_the_summed_cost_better_than_uniform() -> None:
    from pipelines.activation.allocation import _cost

    grid = [0.3, 0.5, 0.7, 0.9]
    alloc = allocate(KL_CURVES, grid, 0.7, max_deviation=1.0)
    total = sum(_cost(c, grid, s) for c, s in zip(KL_CURVES, alloc, strict=True))
    assert total < sum(_cost(c, grid, 0.7) for c in KL_CURVES)


def _ctx(tmp_path: Path, model_dir: Path, text: Path) -> StageContext:
    return StageContext(workdir=tmp_path / "w", inputs={"model": model_dir},
                        data=DataSpec(calibration=str(text), evaluation=str(text)), cache_dir=tmp_path / "cache")


SMALL = dict(sparsities=[0, 0.5, 0.9], layer_sparsities=[0.5, 0.9], samples=4, seq_len=32, eval_seq_len=32,
             eval_windows=4, layer_samples=2, batch_size=4)


def test_stage_end_to_end_writes_report_plot_metrics_and_export(tiny_model_dir: Path, tiny_text_file: Path,
                                                                tmp_path: Path) -> None:
    spec = ActivationProfileStage(**SMALL, export=True, export_sparsity=0.5)
    result = run(spec, _ctx(tmp_path, tiny_model_dir, tiny_text_file))

    report = json.loads(result.outputs["report"].read_text())
    assert result.outputs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = {m.name: m.value for m in result.metrics}
    for name in ("act_critical_sparsity.1pct", "act_critical_sparsity.5pct", "act_ppl.0", "act_ppl.0.9",
                 "act_alloc_ppl.0.5", "act_layer_critical.0", "act_layer_critical.1", "weight_sparsity"):
        assert name in metrics
    assert metrics["act_ppl.0"] == report["dense_perplexity"]
    assert report["weight_sparsity"] == 0.0
    assert report["uniform"]["heldout_sparsity"]["0.5"] == pytest.approx(0.5, abs=0.05)
    row = report["allocation"]["by_mean"]["0.5"]
    assert sum(row["layer_sparsities"]) / 2 == pytest.approx(0.5)
    assert set(report["uniform"]["critical"]) == {"0.01", "0.05"}
    assert set(report["allocation"]["critical_heldout"]) == {"0.01", "0.05"}
    assert len(report["layers"]["kl"]) == 2 and report["layers"]["text"] == "calibration"
    assert "act_alloc_critical_heldout.1pct" in metrics and "act_critical_heldout.5pct" in metrics

    exported, info = load_activation_sparse_model(result.outputs["model"])
    stored = exported.config.activation_sparsity
    assert stored["thresholds"] == report["export"]["thresholds"] and stored["sparsity"] == 0.5
    assert info.backend == "dense" and info.layers == 2
    mlps = [layer.mlp for layer in exported.model.layers]
    assert all(isinstance(m, ThresholdedMLP) for m in mlps)
    assert [m.threshold for m in mlps] == pytest.approx(stored["thresholds"])


def test_stage_profiles_a_weight_pruned_model(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir, pruned)
    model = load_model(pruned)
    with torch.no_grad():
        for mlp in gated_mlps(model):
            mlp.up_proj.weight[:, ::2] = 0
    model.save_pretrained(pruned)
    spec = ActivationProfileStage(**{**SMALL, "layer_sparsities": [0.5]})
    result = run(spec, _ctx(tmp_path, pruned, tiny_text_file))
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["weight_sparsity"] > 0.05


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sparsities", [0.5, 1.0], r"stages\.0\.activation_profile\.sparsities: .*\[0, 1\)"),
        ("sparsities", [], r"stages\.0\.activation_profile\.sparsities: .*at least one"),
        ("sparsities", [-0.1, 0.5], r"stages\.0\.activation_profile\.sparsities: .*\[0, 1\)"),
        ("layer_sparsities", [1.2], r"activation_profile\.layer_sparsities: .*\[0, 1\)"),
        ("tolerances", [], r"activation_profile\.tolerances"),
        ("allocate_at", [0.95], "allocate_at"),
    ],
)
def test_bad_recipe_values_name_the_field(field: str, value, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"stages": [{"stage": "activation_profile", field: value}]})


def test_recipe_parses_the_stage() -> None:
    recipe = parse_recipe({"stages": [{"stage": "activation_profile", "sparsities": [0.9, 0, 0.5]}]})
    assert recipe.stages[0].sparsities == [0.0, 0.5, 0.9]


def test_model_without_gated_ffn_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir)

    class PlainMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    model.model.layers[1].mlp = PlainMLP()
    with pytest.raises(ActivationSparsityError, match=r"model: layer 1 \(PlainMLP\) has no gated FFN"):
        gated_mlps(model)
    with pytest.raises(ActivationSparsityError, match="thresholds: 3 values for 2"):
        install_thresholds(load_model(tiny_model_dir), [0.1, 0.1, 0.1])



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_thresholded_mlp_takes_the_kernel_for_one_token_only_and_matches_dense() -> None:
    pytest.importorskip("triton")
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=256, intermediate_size=1024)).cuda().half()
    layer = ThresholdedMLP(mlp, 0.05, use_kernel=True)
    calls = []
    original = layer.__class__.forward.__globals__["sparse_down_proj"]
    layer.__class__.forward.__globals__["sparse_down_proj"] = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.inference_mode():
            for tokens in (1, 4):
                x = torch.randn(1, tokens, 256, device="cuda", dtype=torch.float16)
                h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                expected = mlp.down_proj(torch.where(h.abs() < 0.05, 0.0, h))
                torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-3)
    finally:
        layer.__class__.forward.__globals__["sparse_down_proj"] = original
    assert calls == [1]  # the 1-token call took the kernel, the 4-token call the dense product
