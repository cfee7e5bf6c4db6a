"""The finetune stage: masked training keeps pruned weights exactly zero; distillation; pass-through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.finetune.masking import capture_masks
from pipelines.modelio import load_model, save_model
from pipelines.recipe import DataSpec, FinetuneStage
from pipelines.stage import StageContext
from pipelines.stages.finetune import run


@pytest.fixture(scope="module")
def pruned_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the smaller half (by magnitude) of every decoder Linear's weights zeroed."""
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                w = lin.weight
                w.masked_fill_(w.abs() <= w.abs().flatten().median(), 0.0)
    return save_model(model, tiny_model_dir, tmp_path_factory.mktemp("pruned") / "model")


def _ctx(tmp_path: Path, model_dir: Path, base_dir: Path, text: Path) -> StageContext:
    return StageContext(workdir=tmp_path / "w", inputs={"model": model_dir, "base_model": base_dir},
                        data=DataSpec(calibration=str(text), evaluation=str(text)), cache_dir=tmp_path / "cache")


def test_pruned_weights_stay_exactly_zero(pruned_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path,
                                          tmp_path: Path) -> None:
    spec = FinetuneStage(steps=40, lr=3e-3, warmup_steps=3, batch_size=2, seq_len=32, grad_accum=2,
                         weight_decay=0.1, beta_kd=0.5)
    before = load_model(pruned_model_dir)
    masks = capture_masks(before)
    assert all(0.45 < m.float().mean() < 0.55 for m in masks.values())

    calls = []
    ctx = _ctx(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file)
    ctx.progress = lambda d, t, m: calls.append(d)
    result = run(spec, ctx)
    after = load_model(result.outputs["model"])
    after_linears = dict(after.named_modules())
    for name, mask in masks.items():
        weight = after_linears[name].weight
        assert torch.count_nonzero(weight[mask]) == 0, name  # exactly zero, not just small
        kept_before = dict(before.named_modules())[name].weight[~mask]
        assert not torch.equal(weight[~mask], kept_before), name  # kept weights did train
    assert result.summary["masked_weights_changed"] == 0
    assert calls == list(range(1, 41))

    series = {name: [m for m in result.metrics if m.name == name] for name in
              ("loss", "loss_ce", "loss_kd", "lr", "tokens_per_s")}
    assert all([m.step for m in s] == list(range(40)) for s in series.values())
    assert all(m.value > 0 for m in series["loss_kd"])
    for m_loss, m_ce, m_kd in zip(series["loss"], series["loss_ce"], series["loss_kd"], strict=True):
        assert m_loss.value == pytest.approx(m_ce.value + 0.5 * m_kd.value, rel=1e-5)
    assert series["lr"][2].value == pytest.approx(3e-3) and series["lr"][-1].value < 1e-4
    assert sum(m.value for m in series["loss"][-5:]) < sum(m.value for m in series["loss"][:5])


def test_zero_steps_copies_the_model_through(pruned_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path,
                                             tmp_path: Path) -> None:
    result = run(FinetuneStage(steps=0), _ctx(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file))
    out = result.outputs["model"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pruned_model_dir.iterdir())
    assert (out / "model.safetensors").read_bytes() == (pruned_model_dir / "model.safetensors").read_bytes()


def test_both_loss_weights_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match="alpha_ce, beta_kd and gamma_hidden are all 0"):
        FinetuneStage(steps=5, alpha_ce=0.0, beta_kd=0.0)
