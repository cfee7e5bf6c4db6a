"""Reading perplexity-vs-sparsity curves: the critical sparsity, and a per-layer allocation.

A curve is a list of (sparsity, perplexity) points; the dense perplexity is the point at 0.

- `critical_sparsity`: walking up the curve, the largest sparsity before the relative perplexity
  increase first exceeds the tolerance, interpolated linearly between the last point within and
  the first point beyond it (the largest measured sparsity if none exceeds it).
- `allocate`: per-layer sparsities with a given mean. Each layer's cost is its log-perplexity curve
  (made non-decreasing, interpolated linearly); starting from 0 everywhere, steps of `step` go, one
  at a time, to the layer whose cost rises least, until the budget `mean x layers` is spent (the
  last step may be partial), so the mean is exact and sensitive layers get less.

Pure functions of numbers; no model.
"""

from __future__ import annotations

import math

import torch


def critical_sparsity(points: list[tuple[float, float]], dense_ppl: float, tolerance: float) -> float:
    """Largest sparsity whose perplexity stays within `(1 + tolerance) x dense_ppl` (see module doc)."""
    limit = dense_ppl * (1.0 + tolerance)
    prev_s, prev_p = 0.0, dense_ppl
    for s, p in sorted(points):
        if s == 0.0:
            continue
        if p > limit:
            if p == prev_p:
                return prev_s
            return prev_s + (limit - prev_p) / (p - prev_p) * (s - prev_s)
        prev_s, prev_p = s, p
    return prev_s


def _cost_table(curves: list[list[float]], grid: list[float], dense_ppl: float, step: float) -> torch.Tensor:
    """log(ppl) of each layer at sparsities 0, step, 2 step, ... max(grid): float64 [layers, steps + 1]."""
    xs = torch.tensor([0.0, *grid], dtype=torch.float64)
    ys = torch.log(torch.tensor([[dense_ppl, *c] for c in curves], dtype=torch.float64))
    ys = torch.cummax(ys, dim=1).values
    fine = torch.arange(0, math.floor(max(grid) / step + 1e-9) + 1, dtype=torch.float64) * step
    right = torch.searchsorted(xs, fine.clamp(max=xs[-1]), right=False).clamp(1, xs.numel() - 1)
    left = right - 1
    weight = (fine - xs[left]) / (xs[right] - xs[left])
    return ys[:, left] * (1 - weight) + ys[:, right] * weight


def allocate(curves: list[list[float]], grid: list[float], dense_ppl: float, mean: float,
             step: float = 0.01) -> list[float]:
    """Per-layer sparsities averaging exactly `mean`, greedy on the per-layer curves (see module doc).

    `curves[i][j]` is the perplexity with only layer i sparsified at `grid[j]` (grid: increasing,
    without 0). No layer goes beyond `max(grid)`.
    """
    if not curves:
        raise ValueError("no layer curves to allocate from")
    if list(grid) != sorted(grid) or not grid or grid[0] <= 0:
        raise ValueError(f"grid must be increasing positive sparsities, got {grid}")
    if not 0.0 <= mean <= max(grid):
        raise ValueError(f"mean sparsity {mean} must be within [0, {max(grid)}] (the largest measured)")
    table = _cost_table(curves, list(grid), dense_ppl, step).tolist()
    layers, top = len(table), len(table[0]) - 1
    steps = [0] * layers
    budget = mean * layers
    whole = math.floor(budget / step + 1e-9)
    for _ in range(whole):
        rise = [table[i][steps[i] + 1] - table[i][steps[i]] if steps[i] < top else math.inf for i in range(layers)]
        steps[min(range(layers), key=lambda i: rise[i])] += 1
    result = [k * step for k in steps]
    remainder = budget - sum(result)
    if remainder > 1e-12:
        room = [i for i in range(layers) if result[i] + remainder <= max(grid) + 1e-12]
        cheapest = min(room, key=lambda i: table[i][min(steps[i] + 1, top)] - table[i][steps[i]])
        result[cheapest] += remainder
    return result
