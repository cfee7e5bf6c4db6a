"""The finetune stage: masked training keeps pruned weights exactly zero; distillation; pass-through."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import stage_context

from pipelines.finetune.masking import capture_masks
from pipelines.modelio import load_model, save_model
from pipelines.recipe import FinetuneStage
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


def test_pruned_weights_stay_exactly_zero(pruned_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path,
                                          tmp_path: Path) -> None:
    spec = FinetuneStage(steps=40, lr=3e-3, warmup_steps=3, batch_size=2, seq_len=32, grad_accum=2,
                         weight_decay=0.1, beta_kd=0.5)
    before = load_model(pruned_model_dir)
    masks = capture_masks(before)
    assert all(0.45 < m.float().mean() < 0.55 for m in masks.values())

    calls = []
    ctx = stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file)
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
    result = run(FinetuneStage(steps=0), stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file))
    out = result.outputs["model"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pruned_model_dir.iterdir())
    assert (out / "model.safetensors").read_bytes() == (pruned_model_dir / "model.safetensors").read_bytes()


def test_both_loss_weights_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match="alpha_ce, beta_kd and gamma_hidden are all 0"):
        FinetuneStage(steps=5, alpha_ce=0.0, beta_kd=0.0)


def _curve(result, names=("loss", "loss_ce", "loss_kd", "lr")) -> list[tuple[str, int, float]]:
    return [(m.name, m.step, m.value) for m in result.metrics if m.name in names]


def test_kd_loss_matches_hand_computation() -> None:
    from pipelines.finetune.losses import kd_kl, kd_kl_topk

    torch.manual_seed(0)
    student, teacher, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7), 2.0
    expected = 0.0
    for b in range(2):
        for pos in range(3):
            p_t = [math.exp(v / t) for v in teacher[b, pos].tolist()]
            p_s = [math.exp(v / t) for v in student[b, pos].tolist()]
            p_t = [v / sum(p_t) for v in p_t]
            p_s = [v / sum(p_s) for v in p_s]
            expected += sum(a * math.log(a / c) for a, c in zip(p_t, p_s, strict=True))
    expected = expected / 6 * t * t
    assert kd_kl(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)
    values, indices = teacher.topk(7, dim=-1)
    assert kd_kl_topk(student, values, indices, t).item() == pytest.approx(expected, rel=1e-5)
    assert kd_kl(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_resume_from_checkpoint_gives_the_same_loss_curve(pruned_model_dir: Path, tiny_model_dir: Path,
                                                          tiny_text_file: Path, tmp_path: Path) -> None:
    spec = FinetuneStage(steps=6, lr=3e-3, warmup_steps=2, batch_size=2, seq_len=32, weight_decay=0.1,
                         beta_kd=0.5, checkpoint_every=2)
    whole = run(spec, stage_context(tmp_path / "whole", pruned_model_dir, tiny_model_dir, tiny_text_file))
    assert whole.outputs["checkpoint"].is_dir()

    class Killed(Exception):
        pass

    def kill_after_step_4(done: int, total: int, message: str) -> None:
        if done == 5:
            raise Killed

    ctx = stage_context(tmp_path / "killed", pruned_model_dir, tiny_model_dir, tiny_text_file)
    ctx.progress = kill_after_step_4
    with pytest.raises(Killed):
        run(spec, ctx)
    resumed_ctx = stage_context(tmp_path / "resumed", pruned_model_dir, tiny_model_dir, tiny_text_file)
    resumed_ctx.inputs["checkpoint"] = tmp_path / "killed" / "w" / "checkpoint"
    resumed = run(spec, resumed_ctx)
    assert "resumed from a checkpoint after step 4" in resumed.notes

    a, b = _curve(whole), _curve(resumed)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in b] == pytest.approx([x[2] for x in a], rel=1e-5)
    w1 = load_model(whole.outputs["model"]).model.layers[1].mlp.up_proj.weight
    w2 = load_model(resumed.outputs["model"]).model.layers[1].mlp.up_proj.weight
    torch.testing.assert_close(w1, w2)


def test_checkpoint_from_other_settings_is_refused(pruned_model_dir: Path, tiny_model_dir: Path,
                                                   tiny_text_file: Path, tmp_path: Path) -> None:
    from pipelines.stage import StageInputError

    spec = FinetuneStage(steps=2, batch_size=2, seq_len=32, checkpoint_every=1)
    first = run(spec, stage_context(tmp_path / "a", pruned_model_dir, tiny_model_dir, tiny_text_file))
    ctx = stage_context(tmp_path / "b", pruned_model_dir, tiny_model_dir, tiny_text_file)
    ctx.inputs["checkpoint"] = first.outputs["checkpoint"]
    with pytest.raises(StageInputError, match="different settings: lr"):
        run(spec.model_copy(update={"lr": 1e-3}), ctx)


def test_lora_trains_only_kept_weights_and_merges(pruned_model_dir: Path, tiny_model_dir: Path,
                                                  tiny_text_file: Path, tmp_path: Path) -> None:
    spec = FinetuneStage(steps=8, lr=1e-2, batch_size=2, seq_len=32, weight_decay=0.1, lora_rank=4)
    result = run(spec, stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file))
    before, after = load_model(pruned_model_dir), load_model(result.outputs["model"])
    assert result.summary["masked_weights_changed"] == 0
    modules_before, modules_after = dict(before.named_modules()), dict(after.named_modules())
    for name, mask in capture_masks(before).items():
        w_before, w_after = modules_before[name].weight, modules_after[name].weight
        assert torch.count_nonzero(w_after[mask]) == 0, name
        assert not torch.equal(w_after[~mask], w_before[~mask]), name
    torch.testing.assert_close(after.model.embed_tokens.weight, before.model.embed_tokens.weight)  # frozen
    assert not any("lora" in key for key in after.state_dict())


def test_teacher_logits_cache_is_reused_and_gives_the_same_losses(pruned_model_dir: Path, tiny_model_dir: Path,
                                                                  tiny_text_file: Path, tmp_path: Path) -> None:
    live_spec = FinetuneStage(steps=3, lr=1e-3, batch_size=2, seq_len=32, beta_kd=1.0, teacher_topk=16)
    cached_spec = live_spec.model_copy(update={"teacher_cache": True})
    live = run(live_spec, stage_context(tmp_path / "live", pruned_model_dir, tiny_model_dir, tiny_text_file))
    ctx = stage_context(tmp_path / "c1", pruned_model_dir, tiny_model_dir, tiny_text_file)
    first = run(cached_spec, ctx)
    second = run(cached_spec, StageContext(**{**ctx.__dict__, "workdir": tmp_path / "c2"}))
    assert "teacher logits: 0 cached, 3 computed" in first.notes
    assert "teacher logits: 3 cached, 0 computed" in second.notes
    assert [x[2] for x in _curve(first)] == pytest.approx([x[2] for x in _curve(live)], rel=1e-6)
    assert [x[2] for x in _curve(second)] == pytest.approx([x[2] for x in _curve(live)], rel=1e-6)


def test_hidden_mse_bf16_and_gradient_checkpointing_keep_masks(pruned_model_dir: Path, tiny_model_dir: Path,
                                                               tiny_text_file: Path, tmp_path: Path) -> None:
    spec = FinetuneStage(steps=3, lr=1e-3, batch_size=2, seq_len=32, beta_kd=1.0, gamma_hidden=0.5,
                         precision="bf16", gradient_checkpointing=True, weight_decay=0.1)
    result = run(spec, stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file))
    assert result.summary["bf16"] and result.summary["masked_weights_changed"] == 0
    hidden = [m.value for m in result.metrics if m.name == "loss_hidden"]
    assert len(hidden) == 3 and all(v > 0 for v in hidden)
    after = load_model(result.outputs["model"])
    modules = dict(after.named_modules())
    masks = capture_masks(load_model(pruned_model_dir))
    assert all(torch.count_nonzero(modules[name].weight[mask]) == 0 for name, mask in masks.items())


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_keeps_masks(pruned_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path,
                                           tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = FinetuneStage(steps=20, lr=3e-3, batch_size=4, seq_len=64, beta_kd=1.0, weight_decay=0.1)
    ctx = stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file)
    ctx.device = torch.device("cuda")
    result = run(spec, ctx)
    assert result.summary["bf16"] and result.summary["masked_weights_changed"] == 0
    losses = [m.value for m in result.metrics if m.name == "loss"]
    assert losses[-1] < losses[0]


def _assert_export_is(compressed: Path, model_dir: Path, fmt: str, targets: list[str]) -> None:
    """The compressed export decompresses to exactly the model in `model_dir`, in format `fmt` over `targets`."""
    from pipelines.export import load_compressed_model, read_sparsity_config

    config = read_sparsity_config(compressed)
    assert config.format == fmt and sorted(config.targets) == sorted(targets)
    exported, final = load_compressed_model(compressed), load_model(model_dir)
    for name, tensor in final.state_dict().items():
        assert torch.equal(exported.state_dict()[name].float(), tensor), name


def test_sparse_model_gets_a_compressed_export_of_the_finetuned_weights(
        pruned_model_dir: Path, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    """No earlier export in the job: the format is judged from the zeros (unstructured here)."""
    spec = FinetuneStage(steps=3, lr=3e-3, batch_size=2, seq_len=32, beta_kd=0.0)
    result = run(spec, stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file))
    linears = sorted(capture_masks(load_model(pruned_model_dir)))
    _assert_export_is(result.outputs["compressed_model"], result.outputs["model"], "sparse-bitmask", linears)
    assert not torch.equal(load_model(result.outputs["model"]).model.layers[0].mlp.up_proj.weight,
                           load_model(pruned_model_dir).model.layers[0].mlp.up_proj.weight)  # it did train


def test_finetune_exports_like_the_earlier_export_and_keeps_bf16(tiny_model_dir: Path, tiny_text_file: Path,
                                                                 tmp_path: Path) -> None:
    """A job's 2:4 export of a bf16 model: the finetuned copy is 2:4 over the same Linears, both dirs bf16."""
    from pipelines.export import export_compressed
    from pipelines.modelio import declared_dtype
    from pipelines.pruning.magnitude import prune_magnitude

    model = load_model(tiny_model_dir)
    targets = [n for n in capture_masks(model) if ".mlp." in n]  # only some Linears were pruned
    with torch.no_grad():
        for name in targets:
            linear = model.get_submodule(name)
            linear.weight.copy_(prune_magnitude(linear.weight, 0.5, (2, 4)).weight)
    pruned = save_model(model, tiny_model_dir, tmp_path / "pruned", dtype=torch.bfloat16)
    earlier = export_compressed(load_model(pruned), tmp_path / "earlier", "sparse-24-bitmask", targets,
                                sparsity_structure="2:4")
    ctx = stage_context(tmp_path, pruned, tiny_model_dir, tiny_text_file)
    ctx.inputs["compressed_model"] = earlier
    result = run(FinetuneStage(steps=2, lr=3e-3, batch_size=2, seq_len=32, beta_kd=0.0), ctx)
    assert declared_dtype(result.outputs["model"]) == torch.bfloat16
    assert declared_dtype(result.outputs["compressed_model"]) == torch.bfloat16
    _assert_export_is(result.outputs["compressed_model"], result.outputs["model"], "sparse-24-bitmask", targets)


def test_no_export_when_the_job_pruned_with_export_none(pruned_model_dir: Path, tiny_model_dir: Path,
                                                        tiny_text_file: Path, tmp_path: Path) -> None:
    ctx = stage_context(tmp_path, pruned_model_dir, tiny_model_dir, tiny_text_file)
    ctx.inputs["masks"] = tmp_path / "masks.safetensors"  # prune ran; it wrote masks but no compressed copy
    result = run(FinetuneStage(steps=1, batch_size=2, seq_len=32, beta_kd=0.0), ctx)
    assert "compressed_model" not in result.outputs


def test_dense_model_gets_no_compressed_export(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    result = run(FinetuneStage(steps=1, batch_size=2, seq_len=32, beta_kd=0.0),
                 stage_context(tmp_path, tiny_model_dir, tiny_model_dir, tiny_text_file))
    assert "compressed_model" not in result.outputs
    modes = {p.stat().st_mode & 0o777 for p in result.outputs["model"].iterdir()}
    assert len(modes) == 1, modes  # model.safetensors is not 0600 while the rest is 0644
