"""Pruning over several devices in one process: the same masks and weights as one device.

On the CPU the devices are [cpu, cpu] (or three): the samples are still split into shards, each
"device" gets its own copy of every layer, the statistics are reduced and the solves spread, so
everything but the peer copies and the threads is exercised.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny_model
from torch import nn

from pipelines.masks import load_masks
from pipelines.pruning import multi_device
from pipelines.pruning.device_plan import Solve, plan_solves, shard_bounds, solve_cost, stage_devices
from pipelines.pruning.engine import MethodConfig, prune_layer
from pipelines.pruning.sequential import run_sequential
from pipelines.pruning.targets import resolve_targets
from pipelines.recipe import DataSpec, prune_stage
from pipelines.stage import StageContext
from pipelines.stages.prune import run as run_prune_stage

TARGETS = [r"re:.*\.(self_attn|mlp)\.\w+_proj$"]
CPU = torch.device("cpu")
LLAMA_8B_ROWS = {"q": 4096, "k": 1024, "v": 1024, "o": 4096, "gate": 14336, "up": 14336, "down": 4096}
LLAMA_8B_COLUMNS = {"q": 4096, "o": 4096, "gate": 4096, "down": 14336}
LLAMA_GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


def _ids(samples: int = 7, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def _prune(devices: list[torch.device], config: MethodConfig, sparsity: float, within_layer: bool,
           dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A fresh tiny Llama pruned on `devices`; the model (back on the CPU) and the masks by Linear name."""
    model = build_tiny_model(512).to(dtype)
    masks: dict[str, torch.Tensor] = {}

    def on_layer(work) -> None:
        for outcome in prune_layer(work, config, sparsity):
            assert outcome.name not in masks, f"{outcome.name} pruned twice"
            masks[outcome.name] = outcome.packed_mask

    run_sequential(model, _ids(), resolve_targets(model, TARGETS, ["lm_head"]), on_layer, devices=devices,
                   batch_size=2, full_stats=config.needs_hessian, within_layer=within_layer)
    return model, masks


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


def _decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in n}


CASES = [
    pytest.param(MethodConfig("sparsegpt"), 0.5, id="sparsegpt-unstructured"),
    pytest.param(MethodConfig("sparsegpt", (2, 4)), 0.5, id="sparsegpt-2:4"),
    pytest.param(MethodConfig("wanda"), 0.5, id="wanda-unstructured"),
]


@pytest.mark.parametrize(("config", "sparsity"), CASES)
@pytest.mark.parametrize("within_layer", [True, False], ids=["within-layer", "one-pass"])
@pytest.mark.parametrize("count", [2, 3])
def test_several_cpu_devices_prune_like_one(config: MethodConfig, sparsity: float, within_layer: bool,
                                            count: int) -> None:
    one_model, one = _prune([CPU], config, sparsity, within_layer)
    many_model, many = _prune([CPU] * count, config, sparsity, within_layer)
    agreement = _agreement(one, many)
    print(f"{config.method} {config.nm} within_layer={within_layer} x{count}: mask agreement {agreement:.6f}")
    assert agreement >= 0.999
    reference, weights = _decoder_weights(one_model), _decoder_weights(many_model)
    for name, weight in reference.items():
        assert torch.allclose(weights[name], weight, rtol=1e-4, atol=1e-5), name
    assert all(w.device == CPU for w in weights.values())


def test_each_solve_sees_every_shards_statistics_and_its_own_layer_copy() -> None:
    """Under one pass, the layer's groups are spread over the copies; each call's statistics count the
    tokens of all samples (reduced over the shards), and the model's own layer ends up with every
    pruned weight."""
    model = build_tiny_model(512)
    ids = _ids(samples=5)
    calls = []
    config = MethodConfig("sparsegpt")

    def on_layer(work) -> None:
        leader = work.groups[0][0]
        calls.append((work.index, id(work.layer), tuple(n.rsplit(".", 1)[1] for n in work.groups[0]),
                      work.stats[leader].tokens))
        prune_layer(work, config, 0.5)

    layers = model.model.layers
    run_sequential(model, ids, resolve_targets(model, TARGETS, ["lm_head"]), on_layer, devices=[CPU, CPU],
                   batch_size=2, within_layer=False)
    assert all(tokens == 5 * 16 for *_, tokens in calls)
    layer0 = [c for c in calls if c[0] == 0]
    assert sorted(name for c in layer0 for name in c[2]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len({c[1] for c in layer0}) == 2, "both copies of the layer solve something"
    for name, module in layers.named_modules():
        if isinstance(module, nn.Linear):
            assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name


def test_worker_threads_keep_the_callers_grad_mode() -> None:
    """Grad mode is thread-local and a new thread starts with it on; the per-device threads must run
    under the driver's no_grad (on 2 H200s, the layer forwards in the threads recorded autograd
    graphs that the activation buffers kept alive: GPU 0 out of memory after a few layers)."""
    with torch.no_grad():
        assert multi_device.run_in_threads([CPU, CPU], lambda i: torch.is_grad_enabled()) == [False, False]
    assert multi_device.run_in_threads([CPU, CPU], lambda i: torch.is_grad_enabled()) == [True, True]


def _graph_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


@pytest.mark.parametrize("within_layer", [True, False])
def test_threaded_devices_keep_no_autograd_graph_across_layers(monkeypatch: pytest.MonkeyPatch,
                                                               within_layer: bool) -> None:
    """The driver with its per-device threads (as on CUDA; here on [cpu, cpu]) leaves no tensor with
    an autograd graph alive after any layer, and prunes like one device."""
    monkeypatch.setattr(multi_device, "run_parallel", lambda devices, work, serial=False: (
        [work(i) for i in range(len(devices))] if serial else multi_device.run_in_threads(devices, work)))
    config = MethodConfig("sparsegpt")
    model = build_tiny_model(512)
    masks: dict[str, torch.Tensor] = {}
    graphs: list[int] = []

    def on_layer(work) -> None:
        for outcome in prune_layer(work, config, 0.5):
            masks[outcome.name] = outcome.packed_mask

    run_sequential(model, _ids(), resolve_targets(model, TARGETS, ["lm_head"]), on_layer, devices=[CPU, CPU],
                   batch_size=2, within_layer=within_layer, progress=lambda *_: graphs.append(_graph_tensors()))
    assert graphs == [0] * len(model.model.layers)
    _, one = _prune([CPU], config, 0.5, within_layer)
    assert _agreement(masks, one) == 1.0


def test_shards_are_contiguous_and_balanced() -> None:
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(128, 2) == [(0, 64), (64, 128)]
    assert shard_bounds(4, 1) == [(0, 4)]
    with pytest.raises(ValueError, match="devices"):
        shard_bounds(4, 0)


def test_one_pass_plan_puts_the_largest_solve_alone() -> None:
    """Llama-3-8B shapes on two devices: down_proj (a 14336-wide Hessian) costs more than the rest
    together, so it gets one device and the other three groups the other."""
    plan = plan_solves(LLAMA_GROUPS, LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 2)
    assert plan == [Solve(0, "down", ("down",)), Solve(1, "q", ("q", "k", "v")), Solve(1, "o", ("o",)),
                    Solve(1, "gate", ("gate", "up"))]


def test_one_group_is_split_at_linear_boundaries() -> None:
    """Within a layer the groups come one at a time: q/k/v splits into q | k,v, gate/up into gate | up,
    and a group of one Linear stays on the first device."""
    plan = plan_solves([["q", "k", "v"]], LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 2)
    assert plan == [Solve(0, "q", ("q",)), Solve(1, "q", ("k", "v"))]
    assert plan_solves([["gate", "up"]], LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 2) == [
        Solve(0, "gate", ("gate",)), Solve(1, "gate", ("up",))]
    assert plan_solves([["down"]], LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 3) == [Solve(0, "down", ("down",))]
    assert plan_solves(LLAMA_GROUPS, LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 1) == [
        Solve(0, "q", ("q", "k", "v")), Solve(0, "o", ("o",)), Solve(0, "gate", ("gate", "up")),
        Solve(0, "down", ("down",))]


def test_many_devices_share_the_groups_by_cost() -> None:
    """Four devices, one pass: every device gets work and no device's load exceeds the largest
    single solve (down_proj) when the others can be balanced below it."""
    plan = plan_solves(LLAMA_GROUPS, LLAMA_8B_ROWS, LLAMA_8B_COLUMNS, 4)
    load = [0.0] * 4
    for solve in plan:
        load[solve.device] += solve_cost(sum(LLAMA_8B_ROWS[n] for n in solve.names), LLAMA_8B_COLUMNS[solve.leader])
    assert sorted({n for s in plan for n in s.names}) == sorted(LLAMA_8B_ROWS)
    assert max(load) == pytest.approx(solve_cost(4096, 14336))
    assert all(x > 0 for x in load)


def test_stage_devices_on_the_cpu_is_the_one_device() -> None:
    assert stage_devices(2.0, CPU) == [CPU]
    assert stage_devices(0.0, CPU) == [CPU]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(("config", "sparsity"), CASES)
@pytest.mark.parametrize("within_layer", [True, False], ids=["within-layer", "one-pass"])
def test_two_gpus_prune_like_one(config: MethodConfig, sparsity: float, within_layer: bool) -> None:
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    one_model, one = _prune(gpus[:1], config, sparsity, within_layer)
    many_model, many = _prune(gpus, config, sparsity, within_layer)
    agreement = _agreement(one, many)
    print(f"{config.method} {config.nm} within_layer={within_layer} 2 GPUs: mask agreement {agreement:.6f}")
    assert agreement >= 0.999
    reference, weights = _decoder_weights(one_model), _decoder_weights(many_model)
    for name, weight in reference.items():
        assert torch.allclose(weights[name], weight, rtol=1e-3, atol=1e-4), name
    assert stage_devices(2.0, gpus[0]) == gpus
    assert stage_devices(1.0, gpus[0]) == gpus[:1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_stage_with_two_gpus_uses_both_and_matches_one(
    tmp_path: Path, tiny_model_dir: Path, pattern: str, caplog: pytest.LogCaptureFixture
) -> None:
    """resources.num_gpus: 2 prunes on both GPUs (the driver says so) with the masks of num_gpus: 1."""
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    calibration = tmp_path / "calibration.safetensors"
    save_file({"input_ids": ids}, str(calibration))
    masks = {}
    for gpus in (1, 2):
        spec = prune_stage(method="sparsegpt", pattern=pattern, resources={"num_gpus": gpus},
                           **({"sparsity": 0.5} if pattern == "unstructured" else {}))
        inputs = {"model": tiny_model_dir, "calibration": calibration}
        ctx = StageContext(workdir=tmp_path / f"out{gpus}", inputs=inputs,
                           data=DataSpec(), seed=0, device=torch.device("cuda", 0))
        with caplog.at_level(logging.INFO, logger="pipelines.pruning.multi_device"):
            result = run_prune_stage(spec, ctx)
        masks[gpus] = load_masks(result.outputs["masks"])
    assert "pruning on 2 devices (cuda:0, cuda:1)" in caplog.text
    same = sum(int((masks[1][n] == masks[2][n]).sum()) for n in masks[1])
    assert same / sum(m.numel() for m in masks[1].values()) >= 0.999
