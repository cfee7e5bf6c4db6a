"""Magnitude, Wanda and SparseGPT as pure functions: exact sparsity, quality order, Cholesky damping."""

from __future__ import annotations

import pytest
import torch

from pipelines.pruning.magnitude import prune_magnitude
from pipelines.pruning.patterns import is_nm_sparse, prune_count
from pipelines.pruning.sparsegpt import HessianNotPositiveDefiniteError, inverse_hessian_factor, prune_sparsegpt
from pipelines.pruning.stats import InputStats, accumulate, relative_output_errors
from pipelines.pruning.wanda import prune_wanda, wanda_scores

ROWS, COLS, TOKENS = 48, 128, 2048


def correlated_inputs(seed: int = 0, cols: int = COLS, tokens: int = TOKENS) -> torch.Tensor:
    """Tokens whose columns are strongly correlated and unevenly scaled, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.rand(cols, generator=g) * 4 + 0.1
    return (torch.randn(tokens, cols, generator=g) @ mixing + 0.05 * torch.randn(tokens, cols, generator=g)) * scale


def stats_of(x: torch.Tensor) -> InputStats:
    stats = InputStats.empty(x.shape[-1], x.device, full=True)
    accumulate(stats, x)
    return stats


def run_method(method: str, weight: torch.Tensor, stats: InputStats, sparsity: float, nm=None):
    if method == "magnitude":
        return prune_magnitude(weight, sparsity, nm)
    if method == "wanda":
        return prune_wanda(weight, stats.col_sq_norms, sparsity, nm)
    return prune_sparsegpt(weight, stats.hessian(), sparsity, nm, block_size=32)


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, InputStats]:
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(3))
    return weight, stats_of(correlated_inputs())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact_per_row(problem, method: str, sparsity: float) -> None:
    weight, stats = problem
    result = run_method(method, weight, stats, sparsity)
    expected = prune_count(COLS, sparsity)
    assert torch.all((~result.mask).sum(1) == expected)
    assert torch.all(result.weight[~result.mask] == 0)
    assert torch.all((result.weight == 0).sum(1) == expected)  # random weights: no kept weight is exactly 0
    assert result.weight.dtype == weight.dtype and result.weight.shape == weight.shape


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_is_valid_in_every_group(problem, method: str, nm: tuple[int, int]) -> None:
    weight, stats = problem
    result = run_method(method, weight, stats, 0.5, nm)
    n, m = nm
    assert torch.all(result.mask.reshape(ROWS, COLS // m, m).sum(-1) == n)
    assert is_nm_sparse(result.weight, nm)
    assert torch.all(result.weight[~result.mask] == 0)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(problem, pattern) -> None:
    weight, stats = problem
    errors = {
        method: float(relative_output_errors(weight, run_method(method, weight, stats, 0.5, pattern).weight,
                                             stats.xtx, [ROWS])[0])
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_relative_output_error_matches_direct_computation(problem) -> None:
    weight, stats = problem
    x = correlated_inputs()
    pruned = prune_magnitude(weight, 0.5).weight
    direct = ((x @ (weight - pruned).t()).square().sum() / (x @ weight.t()).square().sum()).item()
    from_stats = relative_output_errors(weight, pruned, stats.xtx, [20, 28])
    rows_a, rows_b = weight[:20], weight[20:]
    first = ((x @ (rows_a - pruned[:20]).t()).square().sum() / (x @ rows_a.t()).square().sum()).item()
    assert from_stats[0].item() == pytest.approx(first, rel=1e-3)
    whole = relative_output_errors(weight, pruned, stats.xtx, [ROWS])[0].item()
    assert whole == pytest.approx(direct, rel=1e-3)
    assert rows_b.shape[0] == 28


def test_wanda_score_is_weight_times_input_column_norm() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1
    stats = stats_of(x)
    assert torch.allclose(wanda_scores(weight, stats.col_sq_norms), torch.tensor([[5.0, 2.0], [15.0, 0.5]]))
    assert prune_wanda(weight, stats.col_sq_norms, 0.5).mask.tolist() == [[True, False], [True, False]]


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged(problem) -> None:
    weight, stats = problem
    result = prune_sparsegpt(weight, stats.hessian(), 0.0)
    assert torch.allclose(result.weight, weight, atol=1e-5)
    assert result.damping == pytest.approx(0.01)


def test_sparsegpt_block_size_does_not_change_exactness(problem) -> None:
    weight, stats = problem
    for block in (1, 7, 128, 1000):
        result = prune_sparsegpt(weight, stats.hessian(), 0.6, block_size=block)
        assert torch.all((~result.mask).sum(1) == prune_count(COLS, 0.6))
    nm = prune_sparsegpt(weight, stats.hessian(), 0.5, (4, 8), block_size=6)  # rounded to a multiple of M
    assert is_nm_sparse(nm.weight, (4, 8))


def test_sparsegpt_is_deterministic(problem) -> None:
    weight, stats = problem
    a = prune_sparsegpt(weight, stats.hessian(), 0.5)
    b = prune_sparsegpt(weight, stats.hessian(), 0.5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def _indefinite_hessian(cols: int = 32, negative: float = -0.05) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(5)))
    eig = torch.ones(cols)
    eig[-1] = negative
    return (q * eig) @ q.t()


def test_cholesky_failure_raises_damping_tenfold_and_records_it() -> None:
    hessian = _indefinite_hessian()  # mean diagonal ~1, smallest eigenvalue -0.05
    upper, damping = inverse_hessian_factor(hessian, dampening=0.01, retries=4)
    assert damping == pytest.approx(0.1)  # 0.01 leaves an eigenvalue of -0.04; 0.1 makes it +0.05
    assert torch.isfinite(upper).all()
    assert torch.equal(upper, upper.triu())


def test_cholesky_gives_up_with_a_typed_error_after_retries() -> None:
    with pytest.raises(HessianNotPositiveDefiniteError, match="not positive definite"):
        inverse_hessian_factor(_indefinite_hessian(negative=-50.0), dampening=0.01, retries=2)


def test_sparsegpt_survives_a_singular_hessian_with_dead_and_duplicate_columns() -> None:
    x = correlated_inputs(cols=64, tokens=40)  # fewer tokens than columns: rank-deficient
    x[:, 5] = 0.0  # a dead input column
    x[:, 9] = x[:, 8]  # an exact duplicate
    stats = stats_of(x)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    weight[:, 5] = 100.0  # big weights on a dead input: free to prune, pruned first
    result = prune_sparsegpt(weight, stats.hessian(), 0.5, dampening=1e-9, retries=8)
    assert result.damping > 1e-9  # raised, not replaced by the identity
    assert torch.isfinite(result.weight).all()
    assert torch.all((~result.mask).sum(1) == 32)
    assert not result.mask[:, 5].any()
    assert relative_output_errors(weight, result.weight, stats.xtx, [16])[0] < 0.5
    # with the default damping the same singular Hessian factors at once, and SparseGPT beats Wanda
    default = prune_sparsegpt(weight, stats.hessian(), 0.5)
    assert default.damping == pytest.approx(0.01)
    errors = [relative_output_errors(weight, r.weight, stats.xtx, [16])[0]
              for r in (default, prune_wanda(weight, stats.col_sq_norms, 0.5))]
    assert errors[0] < errors[1]


def test_sparsegpt_rejects_a_mismatched_hessian() -> None:
    with pytest.raises(ValueError, match="hessian has shape"):
        prune_sparsegpt(torch.randn(4, 8), torch.eye(6), 0.5)


def test_sparsegpt_rejects_m_not_dividing_columns() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        prune_sparsegpt(torch.randn(4, 12), torch.eye(12), 0.5, (4, 8))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups_take_the_pattern_with_least_obs_loss(problem, monkeypatch, nm: tuple[int, int]) -> None:
    """Scoring every pattern by its replayed loss beats scoring each weight alone (the reference rule)."""
    import pipelines.pruning.sparsegpt as sparsegpt

    weight, stats = problem
    exact = prune_sparsegpt(weight, stats.hessian(), 0.5, nm, block_size=32)
    monkeypatch.setattr(sparsegpt, "MAX_NM_PATTERNS", 0)
    reference = prune_sparsegpt(weight, stats.hessian(), 0.5, nm, block_size=32)
    assert is_nm_sparse(exact.weight, nm) and is_nm_sparse(reference.weight, nm)
    assert float(exact.loss) < float(reference.loss)
    errors = [float(relative_output_errors(weight, r.weight, stats.xtx, [ROWS])[0]) for r in (exact, reference)]
    assert errors[0] < errors[1]


def test_pattern_loss_matches_the_column_loop() -> None:
    """The replayed loss of the chosen pattern is what the column loop then accumulates."""
    from pipelines.pruning.sparsegpt import _cheapest_pattern, _prune_patterns

    x = correlated_inputs(cols=4, tokens=256)
    h = x.t() @ x / 256
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    result = prune_sparsegpt(weight, h, 0.5, (2, 4), block_size=4, dampening=0.01)
    upper, _ = inverse_hessian_factor(h, 0.01)
    keep = _cheapest_pattern(weight.t().contiguous(), upper, torch.ones(4, 1), (2, 4))
    assert torch.equal(keep.t(), result.mask)
    per_pattern = []
    for pattern in _prune_patterns(2, 4):
        forced = torch.tensor(pattern).eq(0).unsqueeze(1).expand(4, 6)
        w, loss = weight.t().clone(), 0.0
        for c in range(4):
            if not forced[c, 0]:
                err = w[c] / upper[c, c]
                loss = loss + err.square()
                w[c:] -= upper[c, c:].unsqueeze(1) * err
        per_pattern.append(loss)
    best = torch.stack(per_pattern).min(0).values.sum() / 2
    assert float(result.loss) == pytest.approx(float(best), rel=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_act_order_permutes_and_restores_columns(problem, nm) -> None:
    weight, stats = problem
    result = prune_sparsegpt(weight, stats.hessian(), 0.5, nm, block_size=32, act_order=True)
    assert torch.all(result.weight[~result.mask] == 0)
    if nm is None:
        assert torch.all((~result.mask).sum(1) == prune_count(COLS, 0.5))
    else:
        assert is_nm_sparse(result.weight, nm)
    # columns (groups) already in decreasing-diagonal order: act order changes nothing
    x = correlated_inputs()
    groups = x.pow(2).sum(0).view(-1, 4).sum(1)
    order = torch.argsort(groups, descending=True)
    x = x.view(x.shape[0], -1, 4)[:, order].reshape(x.shape[0], -1)
    if nm is None:
        x = x[:, torch.argsort(x.pow(2).sum(0), descending=True)]
    h = stats_of(x).hessian()
    plain = prune_sparsegpt(weight, h, 0.5, nm, block_size=32)
    ordered = prune_sparsegpt(weight, h, 0.5, nm, block_size=32, act_order=True)
    assert torch.equal(plain.mask, ordered.mask)
    torch.testing.assert_close(plain.weight, ordered.weight)
