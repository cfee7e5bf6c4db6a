"""The evaluate stage: perplexity, exact sparsity, counts, dense comparison cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import stage_context

from pipelines.data import eval_windows, perplexity
from pipelines.modelio import load_model, load_tokenizer, save_model
from pipelines.recipe import EvaluateStage
from pipelines.stages.evaluate import run


@pytest.fixture(scope="module")
def sparse_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with known zeros: q_proj of layer 0 half zero, down_proj of layer 1 all zero."""
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, :32] = 0  # 64 x 32 = 2048 zeros
        model.model.layers[1].mlp.down_proj.weight.zero_()  # 64 x 128 = 8192 zeros
        model.model.embed_tokens.weight[:10] = 0  # 640 zeros, tied to lm_head
    return save_model(model, tiny_model_dir, tmp_path_factory.mktemp("sparse") / "model")


def test_sparsity_counts_are_exact(sparse_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path,
                                   tmp_path: Path) -> None:
    spec = EvaluateStage(seq_len=32, max_windows=4, batch_size=2, compare_dense=False)
    result = run(spec, stage_context(tmp_path, sparse_model_dir, tiny_model_dir, tiny_text_file))
    metrics = {m.name: m.value for m in result.metrics}
    report = json.loads(result.outputs["report"].read_text())

    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128  # q,o 64x64; k,v 32x64; gate/up/down 64x128
    assert report["sparsity"]["layers"]["model.layers.0"] == {"zeros": 2048, "numel": per_layer,
                                                              "sparsity": 2048 / per_layer}
    assert metrics["sparsity"] == (2048 + 8192) / (2 * per_layer)
    assert metrics["sparsity.model.layers.1"] == 8192 / per_layer
    assert metrics["sparsity.model.layers.0.self_attn.q_proj"] == 0.5
    assert metrics["sparsity.model.layers.1.mlp.down_proj"] == 1.0
    assert metrics["sparsity.model.layers.1.mlp.up_proj"] == 0.0
    assert report["sparsity"]["embeddings"]["zeros"] == 640 and report["sparsity"]["lm_head_tied"]

    model = load_model(sparse_model_dir)
    params = sum(p.numel() for p in model.parameters())
    assert metrics["param_count"] == params
    assert metrics["nonzero_params"] == params - 2048 - 8192 - 640
    size = sum(f.stat().st_size for f in sparse_model_dir.iterdir())
    assert metrics["model_size_bytes"] == size
    assert "dense_perplexity" not in metrics and report["dense_perplexity"] is None


def test_perplexity_matches_data_module_and_dense_is_cached(sparse_model_dir: Path, tiny_model_dir: Path,
                                                            tiny_text_file: Path, tmp_path: Path) -> None:
    spec = EvaluateStage(seq_len=32, max_windows=4, batch_size=3, compare_dense=True)
    ctx = stage_context(tmp_path, sparse_model_dir, tiny_model_dir, tiny_text_file)
    calls = []
    ctx.progress = lambda d, t, m: calls.append((d, t))
    first = {m.name: m.value for m in run(spec, ctx).metrics}
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # model then dense, one bar

    from pipelines.sources import load_text

    text = load_text(str(tiny_text_file), "evaluation", tmp_path)
    windows = eval_windows(load_tokenizer(tiny_model_dir), text, 32, 4)
    assert first["perplexity"] == pytest.approx(perplexity(load_model(sparse_model_dir), windows, 4))
    assert first["dense_perplexity"] == pytest.approx(perplexity(load_model(tiny_model_dir), windows, 4))
    assert first["perplexity"] != first["dense_perplexity"]

    again = run(spec, ctx)
    assert "dense perplexity taken from the cache" in again.notes
    assert {m.name: m.value for m in again.metrics}["dense_perplexity"] == first["dense_perplexity"]
    assert len(list((tmp_path / "cache" / "dense_ppl").glob("*.json"))) == 1
