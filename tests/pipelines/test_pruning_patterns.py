"""Mask selection: exact per-row counts and valid N:M groups, vectorized."""

from __future__ import annotations

import pytest
import torch

from pipelines.pruning.patterns import (
    check_nm,
    is_nm_sparse,
    nm_mask,
    pattern_sparsity,
    prune_count,
    select_mask,
    unstructured_mask,
)


@pytest.mark.parametrize(
    ("columns", "sparsity", "expected"),
    [(10, 0.3, 3), (10, 0.25, 3), (7, 0.5, 4), (100, 0.29, 29), (64, 0.0, 0), (64, 0.999, 64), (3, 0.1, 0)],
)
def test_prune_count_rounds_half_up(columns: int, sparsity: float, expected: int) -> None:
    assert prune_count(columns, sparsity) == expected


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_prune_count_rejects_sparsity_outside_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        prune_count(10, sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.77, 0.95])
def test_unstructured_mask_drops_exact_count_per_row(sparsity: float) -> None:
    score = torch.rand(17, 90, generator=torch.Generator().manual_seed(0))
    mask = unstructured_mask(score, sparsity)
    dropped = (~mask).sum(1)
    assert torch.all(dropped == prune_count(90, sparsity))


def test_unstructured_mask_drops_the_lowest_scores() -> None:
    score = torch.tensor([[5.0, 1.0, 4.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    mask = unstructured_mask(score, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, True, True, False]]


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 7)])
def test_nm_mask_keeps_exactly_n_of_every_m(nm: tuple[int, int]) -> None:
    n, m = nm
    score = torch.rand(12, m * 9, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(score, nm)
    assert torch.all(mask.reshape(12, 9, m).sum(-1) == n)
    assert is_nm_sparse(score * mask, nm)
    # the kept ones are the group's largest
    groups = score.reshape(12, 9, m)
    kept_min = torch.where(mask.reshape(12, 9, m), groups, torch.inf).amin(-1)
    dropped_max = torch.where(mask.reshape(12, 9, m), -torch.inf, groups).amax(-1)
    assert torch.all(kept_min >= dropped_max)


def test_select_mask_dispatches_on_pattern() -> None:
    score = torch.rand(4, 16)
    assert torch.equal(select_mask(score, 0.5, (2, 4)), nm_mask(score, (2, 4)))
    assert torch.equal(select_mask(score, 0.25, None), unstructured_mask(score, 0.25))
    assert pattern_sparsity(0.3, (2, 4)) == 0.5
    assert pattern_sparsity(0.3, None) == 0.3


def test_check_nm_rejects_n_not_below_m() -> None:
    with pytest.raises(ValueError, match="pattern"):
        check_nm(16, (4, 4))


def test_check_nm_rejects_m_not_dividing_columns() -> None:
    with pytest.raises(ValueError, match="M=8 does not divide"):
        check_nm(12, (4, 8))


def test_is_nm_sparse_detects_a_bad_group() -> None:
    weight = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert not is_nm_sparse(weight, (2, 4))
    assert is_nm_sparse(weight, (3, 4))
