"""The activation-sparse down projection: index compaction, the torch reference, and the Triton kernel on CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels.activation_sparse import (
    ActivationSparseError,
    KernelConfig,
    SparseDown,
    active_columns,
    can_use_kernel,
    dense_down,
    gather_down_reference,
    sparse_down_proj,
    threshold_activations,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_sparse_down_round_trips_the_weight() -> None:
    weight, bias = torch.randn(24, 40), torch.randn(24)
    down = SparseDown.from_dense(weight, bias)
    assert down.weight_t.is_contiguous() and down.weight_t.shape == (40, 24)
    assert torch.equal(down.decompress(), weight)


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_active_columns_lists_exactly_the_needed_neurons(tokens: int) -> None:
    h = torch.randn(tokens, 300)
    threshold = 1.5
    idx, count = active_columns(h, threshold)
    expected = torch.nonzero((h.abs() >= threshold).any(0)).flatten()
    assert count.shape == (1,) and int(count) == expected.numel()
    assert torch.equal(idx[: int(count)].long(), expected)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 2.0])
def test_gather_reference_matches_dense(threshold: float) -> None:
    h, weight, bias = torch.randn(5, 300, dtype=torch.float64), torch.randn(48, 300, dtype=torch.float64), None
    down = SparseDown.from_dense(weight, bias)
    torch.testing.assert_close(gather_down_reference(h, down, threshold), dense_down(h, weight, bias, threshold))


def test_threshold_zero_is_the_identity_and_dense_is_bit_exact() -> None:
    h, weight = torch.randn(3, 64), torch.randn(16, 64)
    assert threshold_activations(h, 0.0) is h
    assert torch.equal(dense_down(h, weight, None, 0.0), torch.nn.functional.linear(h, weight))


def test_kernel_refuses_cpu_tensors_with_the_reason() -> None:
    h = torch.randn(1, 64, dtype=torch.float16)
    down = SparseDown.from_dense(torch.randn(16, 64, dtype=torch.float16))
    ok, why = can_use_kernel(h, down)
    assert not ok and why
    with pytest.raises(ActivationSparseError, match="unavailable"):
        sparse_down_proj(h, down, 0.5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_kernel_matches_dense_on_gpu(tokens: int, dtype: torch.dtype, sparsity: float) -> None:
    pytest.importorskip("triton")
    device = torch.device("cuda")
    h = torch.randn(tokens, 1000, device=device, dtype=dtype)
    weight = torch.randn(300, 1000, device=device, dtype=dtype) * 0.05
    bias = torch.randn(300, device=device, dtype=dtype)
    threshold = torch.quantile(h.float().abs().flatten(), sparsity).item() if sparsity else 0.0
    reference = dense_down(h.double(), weight.double(), bias.double(), threshold)
    down = SparseDown.from_dense(weight, bias)
    for config in (KernelConfig(), KernelConfig(block_n=64, block_k=32, rows_per_program=1000)):
        out = sparse_down_proj(h, down, threshold, config)
        assert out.shape == (tokens, 300) and out.dtype == dtype
        assert _rel(out, reference) < 1e-2


@pytest.mark.gpu
@gpu
def test_kernel_resets_its_counters_and_replays_in_a_cuda_graph() -> None:
    pytest.importorskip("triton")
    device = torch.device("cuda")
    h = torch.randn(4, 2048, device=device, dtype=torch.float16)
    weight = torch.randn(512, 2048, device=device, dtype=torch.float16) * 0.02
    down = SparseDown.from_dense(weight)
    config = KernelConfig(block_n=64, block_k=64, rows_per_program=256)
    first = sparse_down_proj(h, down, 0.8, config)
    again = sparse_down_proj(h, down, 0.8, config)
    torch.testing.assert_close(first, again, rtol=2e-3, atol=1e-4)  # atomic sums: order may move an ulp
    assert all(int(c.abs().sum()) == 0 for c in down.counters.values())
    assert int(down.workspace.abs().sum()) == 0
    static_h = h.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sparse_down_proj(static_h, down, 0.8, config)
    for _ in range(3):
        static_h.copy_(torch.randn_like(h))
        graph.replay()
        torch.testing.assert_close(static_out, sparse_down_proj(static_h, down, 0.8, config), rtol=2e-3, atol=1e-4)
