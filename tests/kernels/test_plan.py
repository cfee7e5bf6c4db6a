"""Kernel plan format, load/save, and applying a plan (CPU: dense fallback and dispatch by tokens)."""

import json

import pytest
import torch
from counting_backend import CountingReference
from torch import nn

from kernels.backends import DenseBackend, ReferenceBackend, nearest_bucket
from kernels.plan import (
    PLAN_FORMAT,
    Environment,
    GraphMode,
    KernelChoice,
    KernelPlan,
    PlanError,
    ShapePlan,
    SparseLinear,
    apply_plan,
    dense_plan,
    load_plan,
    plan_from_tuning,
    save_plan,
)
from kernels.sparse24 import mask_24

ENV = Environment(gpu=None, torch=torch.__version__)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=True)
        self.other = nn.Linear(16, 32, bias=False)  # same shape as `up`, not pruned
        with torch.no_grad():
            self.up.weight.mul_(mask_24(self.up.weight))
            self.down.weight.mul_(mask_24(self.down.weight))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.other(x).sum(-1, keepdim=True)


def _plan(backend_by_tokens: dict[int, str]) -> KernelPlan:
    choices = {t: KernelChoice(backend=b, reason="test") for t, b in backend_by_tokens.items()}
    return KernelPlan(environment=ENV, dtype="float16", tokens=sorted(choices),
                      shapes={"32x16": ShapePlan(out_features=32, in_features=16, choices=choices),
                              "16x32": ShapePlan(out_features=16, in_features=32, choices=choices)})


def _backends():
    return {"dense": DenseBackend(), "sparse24-reference": ReferenceBackend()}


def test_save_load_round_trip(tmp_path):
    plan = _plan({1: "dense", 512: "sparse24-reference"})
    path = save_plan(plan, tmp_path / "kernel_plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == PLAN_FORMAT and data["version"] == 1
    assert set(data["shapes"]["32x16"]["choices"]) == {"1", "512"}  # JSON keys are token counts
    assert load_plan(path) == plan


def test_load_rejects_other_version_and_unknown_keys(tmp_path):
    data = _plan({1: "dense"}).model_dump(mode="json")
    (tmp_path / "v2.json").write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(PlanError, match="version 2"):
        load_plan(tmp_path / "v2.json")
    data["shapes"]["32x16"]["choices"]["1"]["backnd"] = "dense"
    (tmp_path / "typo.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"shapes\.32x16\.choices\.1\.backnd"):
        load_plan(tmp_path / "typo.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "bad.json")


def test_dense_plan_marks_every_shape_dense_with_reason_and_no_timing():
    plan = dense_plan({"32x16": (32, 16, ["up"])}, [1, 2048], "float16", "no CUDA GPU", ENV)
    choices = plan.shapes["32x16"].choices
    assert {c.backend for c in choices.values()} == {"dense"}
    assert all(c.reason == "no CUDA GPU" and c.times_ms == {} and c.speedup is None for c in choices.values())
    assert plan.sparse_shapes() == {}


def test_apply_dense_plan_leaves_model_untouched():
    model = Tiny()
    report = apply_plan(model, _plan({1: "dense", 64: "dense"}), backends=_backends())
    assert report.replaced == {}
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.other))


def test_apply_plan_swaps_only_24_linears_and_keeps_outputs():
    model = Tiny().to(torch.float16)
    x = torch.randn(3, 16, dtype=torch.float16)
    before = model(x)
    report = apply_plan(model, _plan({1: "dense", 64: "sparse24-reference"}), backends=_backends())
    assert set(report.replaced) == {"up", "down"}
    assert report.dense == {"other": "weight does not follow 2:4"}
    assert isinstance(model.up, SparseLinear) and type(model.other) is nn.Linear
    torch.testing.assert_close(model(x), before, rtol=2e-3, atol=2e-3)  # bias added after, not fused


def test_sparse_linear_picks_backend_by_runtime_tokens():
    model = Tiny().to(torch.float16)
    apply_plan(model, _plan({1: "dense", 64: "sparse24-reference"}), backends=_backends())
    assert model.up.backend_for(1) == "dense"
    assert model.up.backend_for(3) == "dense"
    assert model.up.backend_for(16) == "sparse24-reference"
    assert model.up.backend_for(10_000) == "sparse24-reference"
    assert nearest_bucket(8, [1, 64]) == 64  # equal log distance: the larger bucket


def test_apply_plan_with_explicit_masks():
    model = Tiny().to(torch.float16)
    mask = mask_24(model.up.weight) | True  # keeps everything: not 2:4, but masks are taken as given
    report = apply_plan(model, _plan({1: "sparse24-reference"}), masks={"down": mask_24(model.down.weight)},
                        backends=_backends())
    assert set(report.replaced) == {"down"} and report.dense["up"] == "no mask given"
    assert mask.all()


def test_apply_plan_refuses_plan_from_another_gpu():
    plan = _plan({1: "sparse24-reference"})
    plan = plan.model_copy(update={"environment": ENV.model_copy(update={"gpu": "Some Other GPU"})})
    with pytest.raises(PlanError, match="tune again"):
        apply_plan(Tiny(), plan, backends=_backends())


def test_apply_plan_refuses_unknown_backend():
    with pytest.raises(PlanError, match="not available"):
        apply_plan(Tiny().to(torch.float16), _plan({1: "warp-drive"}), backends=_backends())


def test_plan_from_tuning_validates_choices():
    tuned = {"32x16": {1: {"backend": "dense", "config": {}, "times_ms": {"dense": 0.01}, "speedup": 1.0,
                           "reason": "no correct sparse backend", "max_rel_error": {"dense": 0.0}}}}
    plan = plan_from_tuning(tuned, {"32x16": ["up"]}, [1], "float16", ENV)
    assert plan.shapes["32x16"].layers == ["up"] and plan.shapes["32x16"].choices[1].times_ms == {"dense": 0.01}


def test_apply_plan_refuses_a_dtype_it_was_not_tuned_for():
    with pytest.raises(PlanError, match="tuned for float16"):
        apply_plan(Tiny(), _plan({1: "sparse24-reference"}), backends=_backends())


def test_documented_plan_sample_validates():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "kernels.md").read_text()
    sample = doc.split("```json", 1)[1].split("```", 1)[0]
    plan = KernelPlan.model_validate(json.loads(sample))
    assert plan.shapes["4096x14336"].choices[2048].backend == "cusparselt-planned"


def test_dense_route_is_exactly_nn_linear_with_its_bias_fused():
    model = Tiny().to(torch.float16)
    x = torch.randn(1, 32, dtype=torch.float16)
    reference = model.down(x)
    counting = CountingReference()
    apply_plan(model, _plan({1: "dense", 64: "sparse24-reference"}),
               backends={"dense": DenseBackend(), "sparse24-reference": counting})
    assert torch.equal(model.down(x), reference)  # same call as nn.Linear: bitwise equal, not close
    assert counting.calls == 0
    model.down(torch.randn(64, 32, dtype=torch.float16))
    assert counting.calls == 1


def test_eager_calls_follow_the_eager_backend_and_graphs_the_plan_backend():
    choices = {1: KernelChoice(backend="sparse24-reference", eager_backend="dense", reason="test"),
               64: KernelChoice(backend="sparse24-reference", reason="test")}
    layer = nn.Linear(32, 16, bias=False).to(torch.float16)
    with torch.no_grad():
        layer.weight.mul_(mask_24(layer.weight))
    counting = CountingReference()
    sparse = SparseLinear(layer, None, choices, {"dense": DenseBackend(), "sparse24-reference": counting})
    assert (sparse.backend_for(1), sparse.backend_for(1, graphed=True)) == ("dense", "sparse24-reference")
    assert sparse.backend_for(64) == sparse.backend_for(64, graphed=True) == "sparse24-reference"
    x = torch.randn(1, 32, dtype=torch.float16)
    assert torch.equal(sparse(x), layer(x)) and counting.calls == 0  # eager on the CPU: dense
    sparse(torch.randn(64, 32, dtype=torch.float16))
    assert counting.calls == 1
    assert "1:sparse24-reference (eager dense)" in repr(sparse)


def test_layers_read_the_models_graph_mode_instead_of_asking_the_stream():
    """apply_plan's pre-hook asks once per model call whether a CUDA graph is being captured; the layers
    whose routes differ by mode read that answer, and ask for themselves only outside a model call."""
    choices = {1: KernelChoice(backend="sparse24-reference", eager_backend="dense", reason="test"),
               64: KernelChoice(backend="sparse24-reference", reason="test")}
    layer = nn.Linear(32, 16, bias=False).to(torch.float16)
    with torch.no_grad():
        layer.weight.mul_(mask_24(layer.weight))
    counting, mode = CountingReference(), GraphMode()
    sparse = SparseLinear(layer, None, choices, {"dense": DenseBackend(), "sparse24-reference": counting},
                          graph_mode=mode)
    x = torch.randn(1, 32, dtype=torch.float16)
    sparse(x)
    assert counting.calls == 0  # no model call under way: asked itself (a CPU tensor is never captured)
    mode.capturing = True
    sparse(x)
    assert counting.calls == 1  # the model's call is being captured: the graphed route
    mode.capturing = False
    sparse(x)
    assert counting.calls == 1


def test_apply_plan_shares_one_graph_mode_and_hooks_the_model_only_on_cuda():
    model = Tiny().to(torch.float16)
    plan = _plan({1: "sparse24-reference", 64: "sparse24-reference"})
    for shape in plan.shapes.values():
        shape.choices[1].eager_backend = "dense"
    report = apply_plan(model, plan, backends=_backends())
    assert {id(model.up._graph_mode)} == {id(model.down._graph_mode)}
    assert report.graph_mode_hooks == []  # a CPU model is never captured: no hook, no cost per call


def test_a_plan_without_eager_routes_runs_its_backend_in_both_modes(tmp_path):
    plan = _plan({1: "sparse24-reference"})
    path = save_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    for shape in data["shapes"].values():  # as plans written before eager routing looked
        for choice in shape["choices"].values():
            for key in ("eager_backend", "eager_reason", "host_us"):
                choice.pop(key)
    path.write_text(json.dumps(data))
    choice = load_plan(path).shapes["32x16"].choices[1]
    assert choice.route(graphed=False) == choice.route(graphed=True) == "sparse24-reference"


@pytest.mark.parametrize("routes", [
    {1: ("dense", None), 16: ("dense", None), 512: ("sparse24-reference", None)},
    {1: ("sparse24-reference", "dense"), 64: ("sparse24-reference", None)},
    {1: ("dense", None), 7: ("sparse24-reference", "dense"), 300: ("dense", None)},
    {4: ("sparse24-reference", None)},
    {1: ("dense", None), 2048: ("dense", None)},
])
def test_the_dense_fast_paths_cover_exactly_the_counts_that_route_dense(routes):
    """One fast path for counts dense in both modes, one for counts dense when run eagerly."""
    choices = {t: KernelChoice(backend=b, eager_backend=e) for t, (b, e) in routes.items()}
    layer = nn.Linear(32, 16, bias=True)
    with torch.no_grad():
        layer.weight.mul_(mask_24(layer.weight))
    sparse = SparseLinear(layer, None, choices, _backends())
    for modes, numel in (((False, True), sparse._dense_numel), ((False,), sparse._eager_dense_numel)):
        dense = [all(sparse.backend_for(t, g) == "dense" for g in modes) for t in range(1, 5000)]
        expected = dense.index(False) if False in dense else None
        if expected is None:
            assert numel >= 5000 * 32
        else:
            assert max(numel, 0) == expected * 32  # -1: no dense route at all
