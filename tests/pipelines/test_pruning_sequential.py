"""The layer-sequential driver: shared-input groups, the model's own inputs, pruned outputs fed on."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model
from torch import nn

from pipelines.pruning.engine import MethodConfig, prune_layer
from pipelines.pruning.sequential import CalibrationError, run_sequential
from pipelines.pruning.targets import resolve_targets

TARGETS = [r"re:.*\.(self_attn|mlp)\.\w+_proj$"]


@pytest.fixture()
def model() -> nn.Module:
    return build_tiny_model(512)


def _ids(samples: int = 6, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def _inputs_seen(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def test_linears_sharing_an_input_share_one_statistics_group(model: nn.Module) -> None:
    groups = {}
    run_sequential(model, _ids(), resolve_targets(model, TARGETS, ["lm_head"]),
                   lambda work: groups.setdefault(work.index, (work.groups, work.stats)), device=torch.device("cpu"))
    names, stats = groups[0]
    short = [[n.split(".")[-1] for n in group] for group in names]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert set(stats) == {group[0] for group in names}
    assert all(s.tokens == 6 * 16 for s in stats.values())


def test_statistics_without_pruning_match_the_models_own_forward(model: nn.Module) -> None:
    ids = _ids()
    name = "model.layers.1.mlp.down_proj"
    x = _inputs_seen(model, name, ids)
    captured = {}

    def keep(work) -> None:
        if work.index == 1:
            leader = next(g[0] for g in work.groups if name in g)
            captured["xtx"] = work.stats[leader].xtx.clone()

    run_sequential(model, ids, resolve_targets(model, TARGETS, ["lm_head"]), keep, device=torch.device("cpu"),
                   batch_size=4)
    assert torch.allclose(captured["xtx"], x.t() @ x, rtol=1e-4, atol=1e-4)


def test_pruned_outputs_feed_the_next_layer(model: nn.Module) -> None:
    ids = _ids()
    name = "model.layers.1.self_attn.q_proj"
    config = MethodConfig("sparsegpt")
    dense_next = {}
    for propagate in ("pruned", "dense"):
        trial = build_tiny_model(512)

        def prune(work, propagate=propagate) -> None:
            if work.index == 1:
                dense_next[propagate] = work.stats[name].xtx.clone()
            prune_layer(work, config, 0.5)

        run_sequential(trial, ids, resolve_targets(trial, TARGETS, ["lm_head"]), prune, device=torch.device("cpu"),
                       propagate=propagate)
        if propagate == "pruned":
            pruned_model = trial
    # layer 1 saw layer 0's pruned outputs: exactly what the pruned model's own forward gives
    x = _inputs_seen(pruned_model, name, ids)
    assert torch.allclose(dense_next["pruned"], x.t() @ x, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(dense_next["pruned"], dense_next["dense"], rtol=1e-3)
    dense_x = _inputs_seen(model, name, ids)
    assert torch.allclose(dense_next["dense"], dense_x.t() @ dense_x, rtol=1e-4, atol=1e-3)


def test_peak_memory_is_zero_on_cpu(model: nn.Module) -> None:
    peak = run_sequential(model, _ids(2, 8), resolve_targets(model, TARGETS, ["lm_head"]), lambda w: None,
                          device=torch.device("cpu"))
    assert peak == 0


def test_empty_calibration_is_rejected_before_any_work(model: nn.Module) -> None:
    with pytest.raises(CalibrationError, match="calibration"):
        run_sequential(model, torch.zeros(0, 16, dtype=torch.long), {}, lambda w: None, device=torch.device("cpu"))


def test_progress_reports_every_layer(model: nn.Module) -> None:
    calls = []
    run_sequential(model, _ids(2, 8), resolve_targets(model, TARGETS, ["lm_head"]), lambda w: None,
                   device=torch.device("cpu"), progress=lambda d, t, m: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


def test_within_layer_calibrates_each_group_on_the_pruned_groups_before_it(model: nn.Module) -> None:
    ids = _ids()
    config = MethodConfig("sparsegpt")
    seen: dict[str, torch.Tensor] = {}
    order: list[list[str]] = []

    def prune(work) -> None:
        if work.index == 0:
            order.extend(work.groups)
            for leader, stats in work.stats.items():
                seen[leader] = stats.xtx.clone()
        prune_layer(work, config, 0.5)

    run_sequential(model, ids, resolve_targets(model, TARGETS, ["lm_head"]), prune, device=torch.device("cpu"),
                   within_layer=True, batch_size=4)
    short = [[n.split(".")[-1] for n in group] for group in order]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    # every group's statistics are those of the finished (all pruned) layer 0's own forward
    for leader in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        name = f"model.layers.0.{leader}"
        x = _inputs_seen(model, name, ids)
        assert torch.allclose(seen[name], x.t() @ x, rtol=1e-4, atol=1e-3), leader
    dense = build_tiny_model(512)
    x_dense = _inputs_seen(dense, "model.layers.0.mlp.down_proj", ids)
    assert not torch.allclose(seen["model.layers.0.mlp.down_proj"], x_dense.t() @ x_dense, rtol=1e-3)


@pytest.mark.parametrize(("within_layer", "down_calls"), [(True, 1 + 3), (False, 1 + 3)])
def test_measuring_passes_stop_once_their_statistics_are_recorded(
    model: nn.Module, within_layer: bool, down_calls: int
) -> None:
    """With the outputs recomputed after pruning, a measuring pass runs the whole layer on its first
    batch only (to find the groups); later batches stop at the last statistics they keep. down_proj,
    the last Linear, then computes once in measuring and once per batch in the propagating pass."""
    calls = []
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    handle = down.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    ids = _ids(6, 16)
    stats = {}

    def keep(work) -> None:
        if work.index == 0:
            stats.update({leader: s.xtx.clone() for leader, s in work.stats.items()})

    run_sequential(model, ids, resolve_targets(model, TARGETS, ["lm_head"]), keep, device=torch.device("cpu"),
                   batch_size=2, within_layer=within_layer)
    handle.remove()
    assert len(calls) == down_calls  # 3 batches: 1 in the measuring passes, 3 in the propagating one
    for leader, xtx in stats.items():  # nothing is lost by stopping: every token is in every statistic
        x = _inputs_seen(model, leader, ids)
        assert torch.allclose(xtx, x.t() @ x, rtol=1e-4, atol=1e-3), leader


@pytest.mark.parametrize("batch_size", [2, 4])
def test_replaying_finished_attention_prunes_exactly_as_recomputing_it(batch_size: int) -> None:
    """Within a layer, once q/k/v and o are pruned the attention block's output is recorded and
    reused by the later passes; the pruned model is bit for bit the one that recomputes it."""
    results, attention_calls = [], []
    for replay in (False, True):
        model = build_tiny_model(512)
        calls = []
        attn = model.get_submodule("model.layers.0.self_attn")
        inner = attn.q_proj.register_forward_hook(lambda m, a, out, calls=calls: calls.append(1))
        run_sequential(model, _ids(6, 16), resolve_targets(model, TARGETS, ["lm_head"]),
                       lambda work: prune_layer(work, MethodConfig("sparsegpt"), 0.5), device=torch.device("cpu"),
                       batch_size=batch_size, within_layer=True, replay=replay)
        inner.remove()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        attention_calls.append(len(calls))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    batches = -(-6 // batch_size)
    # q_proj computes in: the first pass's first batch, the o_proj and gate/up passes, and (without
    # replay) the down_proj and propagating passes; with replay the last two reuse the record
    assert attention_calls == [1 + 4 * batches, 1 + 2 * batches]
