"""OWL: per-layer sparsities keep the mean, stay within ±λ, and follow the outlier ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.pruning.owl import outlier_ratio, owl_sparsities
from pipelines.pruning.patterns import prune_count
from pipelines.recipe import DataSpec, WandaPrune
from pipelines.stage import StageContext
from pipelines.stages.prune import run


def test_owl_sparsities_keep_the_mean_and_stay_within_lambda() -> None:
    ratios = [0.01, 0.05, 0.02, 0.20, 0.03]
    values = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(values) / len(values) == pytest.approx(0.5)
    assert all(0.42 - 1e-12 <= v <= 0.58 + 1e-12 for v in values)
    assert max(abs(v - 0.5) for v in values) == pytest.approx(0.08)
    # more outliers -> less sparsity
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [values[i] for i in order] == sorted(values, reverse=True)


def test_owl_sparsities_are_uniform_when_ratios_are_equal() -> None:
    assert owl_sparsities([0.1, 0.1, 0.1], 0.6, 0.1) == [0.6, 0.6, 0.6]


def test_owl_sparsities_reject_lambda_leaving_unit_interval() -> None:
    with pytest.raises(ValueError, match="owl_lambda"):
        owl_sparsities([0.1, 0.2], 0.95, 0.1)


def test_outlier_ratio_counts_scores_above_threshold_times_mean() -> None:
    weights = [torch.ones(2, 4)]
    norms = [torch.tensor([1.0, 1.0, 1.0, 100.0**2])]  # one input column is a 100x outlier
    # scores: six 1s and two 100s; mean 25.75; 2 of 8 above 3 x mean
    assert float(outlier_ratio(weights, norms, 3.0)) == pytest.approx(0.25)
    assert float(outlier_ratio(weights, norms, 5.0)) == 0.0


@pytest.fixture()
def calibration(tmp_path: Path, tiny_model_dir: Path) -> Path:
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "calibration.safetensors"
    save_file({"input_ids": ids}, str(path))
    return path


def test_owl_stage_varies_layers_keeps_mean_and_prunes_each_layer_to_its_sparsity(
    tmp_path: Path, tiny_model_dir: Path, calibration: Path
) -> None:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # make layer 1's inputs outlier-heavy so the layers differ
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.model.layers[1].input_layernorm.weight[:3] = 40.0
        model.model.layers[1].post_attention_layernorm.weight[:3] = 40.0
        model.save_pretrained(tmp_path / "skewed")
    from pipelines.modelio import load_tokenizer

    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "skewed")
    spec = WandaPrune(sparsity=0.5, profile="owl", owl_lambda=0.1, export="none")
    ctx = StageContext(workdir=tmp_path / "out", inputs={"model": tmp_path / "skewed", "calibration": calibration},
                       data=DataSpec())
    result = run(spec, ctx)
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    layer = {int(k): v for k, v in report["layer_sparsity"].items()}
    assert sum(layer.values()) / len(layer) == pytest.approx(0.5)
    assert layer[0] == pytest.approx(0.6) and layer[1] == pytest.approx(0.4)  # layer 1 has the outliers
    pruned = AutoModelForCausalLM.from_pretrained(result.outputs["model"])
    for name, module in pruned.named_modules():
        if name.endswith("_proj"):
            index = int(name.split(".")[2])
            zeros = (module.weight == 0).sum(1)
            assert torch.all(zeros == prune_count(module.in_features, layer[index])), name
