"""Every backend against dense on a CUDA GPU (skipped cleanly without one)."""

import pytest
import torch
import torch.nn.functional as F

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
