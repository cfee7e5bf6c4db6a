"""Every backend against dense on a CUDA GPU (skipped cleanly without one)."""

import pytest
import torch
import torch.nn.functional as F
from counting_backend import CountingReference

from kernels.backends import BACKENDS, make_backends
from kernels.sparse24 import mask_24

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPARSE = [n for n in BACKENDS if n != "dense"]


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda")


def _available(name: str, device: torch.device):
    backend = make_backends([name])[name]
    ok, why = backend.available(device)
    if not ok:
        pytest.skip(f"{name}: {why}")
    return backend


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_backend_matches_dense(name, dtype, tokens, device):
    backend = _available(name, device)
    weight = torch.randn(256, 512, device=device, dtype=dtype)
    mask = mask_24(weight)
    x = torch.randn(tokens, 512, device=device, dtype=dtype)
    handle = backend.prepare(weight, mask)
    y = backend.linear(x, handle)
    ref = F.linear(x.float(), (weight * mask).float())
    assert y.shape == (tokens, 256) and y.dtype == dtype
    assert torch.isfinite(y).all()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("name", SPARSE)
def test_backend_keeps_leading_dims(name, device):
    backend = _available(name, device)
    weight = torch.randn(128, 256, device=device, dtype=torch.float16)
    x = torch.randn(2, 5, 256, device=device, dtype=torch.float16)
    handle = backend.prepare(weight, mask_24(weight))
    assert backend.linear(x, handle).shape == (2, 5, 128)


def test_planned_backend_reuses_its_plan(device):
    backend = _available("cusparselt-planned", device)
    weight = torch.randn(256, 512, device=device, dtype=torch.float16)
    handle = backend.prepare(weight, mask_24(weight))
    x = torch.randn(32, 512, device=device, dtype=torch.float16)
    backend.linear(x, handle)
    plans = dict(backend._plans)
    backend.linear(torch.randn_like(x), handle)
    assert dict(backend._plans) == plans and len(plans) == 1


def test_graph_capture_replays_on_new_inputs_and_times(device):
    from kernels.timing import capture_graph, time_graph_us

    x = torch.randn(64, 64, device=device)
    graph, out = capture_graph(lambda: x @ x)
    x.copy_(torch.eye(64, device=device))  # the captured call reads the buffer's new contents
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, torch.eye(64, device=device))
    assert time_graph_us(lambda: x @ x) > 0


def test_a_layer_sparse_only_in_graphs_runs_dense_eagerly_and_its_backend_when_captured(device):
    """Eager decode takes the dense fast path; a CUDA graph captures the plan's backend, and replays it."""
    from kernels.backends import DenseBackend
    from kernels.plan import KernelChoice, SparseLinear
    from kernels.timing import capture_graph

    layer = torch.nn.Linear(512, 256, bias=True, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(mask_24(layer.weight))
    choices = {1: KernelChoice(backend="sparse24-reference", eager_backend="dense"),
               64: KernelChoice(backend="sparse24-reference")}
    counting = CountingReference()
    sparse = SparseLinear(layer, None, choices, {"dense": DenseBackend(), "sparse24-reference": counting})
    x = torch.randn(1, 512, device=device, dtype=torch.bfloat16)
    assert torch.equal(sparse(x), layer(x)) and counting.calls == 0
    graph, out = capture_graph(lambda: sparse(x))
    assert counting.calls == 1  # the captured call; capture_graph's warm-up calls ran eagerly, dense
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, layer(x), rtol=2e-2, atol=2e-2)
    assert counting.calls == 1  # a replay runs no Python


def test_a_captured_model_runs_its_graphed_routes_and_replays_them(device):
    """apply_plan's graph-mode hook: eagerly the layers run dense, captured they run the plan's backend."""
    from kernels.backends import DenseBackend
    from kernels.plan import Environment, KernelChoice, KernelPlan, ShapePlan, apply_plan
    from kernels.timing import capture_graph

    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256, bias=True)).to(device, torch.bfloat16)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(mask_24(layer.weight))
    choices = {1: KernelChoice(backend="sparse24-reference", eager_backend="dense"),
               64: KernelChoice(backend="sparse24-reference")}
    plan = KernelPlan(environment=Environment(torch=torch.__version__), dtype="bfloat16", tokens=[1, 64],
                      shapes={f"{o}x{i}": ShapePlan(out_features=o, in_features=i, choices=choices)
                              for o, i in ((512, 256), (256, 512))})
    counting = CountingReference()
    report = apply_plan(model, plan, backends={"dense": DenseBackend(), "sparse24-reference": counting},
                        check_env=False)
    assert len(report.replaced) == 2 and len(report.graph_mode_hooks) == 2
    x = torch.randn(1, 256, device=device, dtype=torch.bfloat16)
    eager = model(x)
    assert counting.calls == 0
    graph, out = capture_graph(lambda: model(x))
    assert counting.calls == 2  # both layers, in the captured call only
    assert model[0]._graph_mode.capturing is None  # reset once the call returned
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
