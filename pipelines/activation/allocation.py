"""Reading perplexity-vs-sparsity curves: the critical sparsity, and a per-layer allocation.

A curve is a list of (sparsity, perplexity) points; the dense perplexity is the point at 0.

- `critical_sparsity`: walking up the curve, the largest sparsity before the relative perplexity
  increase first exceeds the tolerance, interpolated linearly between the last point within and
  the first point beyond it (the largest measured sparsity if none exceeds it).
- `allocate`: per-layer sparsities with a given mean. A layer's cost at sparsity s is the KL
  divergence its sparsification alone causes in the next-token distribution (measured on the
  calibration text at the grid points), interpolated log-linearly between grid points and as a power
  law below the first one, so the curve is smooth and convex-like and its marginal cost rises with s.
  Starting from `mean - max_deviation` everywhere, steps of `step` go, one at a time, to the layer
  whose cost rises least, until the budget `mean x layers` is spent (the last step may be partial).
  KL, unlike the perplexity change of one layer, is never negative and adds up over layers to first
  order; the cap keeps a noisy curve from pushing one layer far from the rest.

Pure functions of numbers; no model.
"""

from __future__ import annotations

import math


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


def _cost(curve: list[float], grid: list[float], s: float) -> float:
    """KL of one layer at sparsity s, from its values at the grid points (see module doc)."""
    if s <= 0.0:
        return 0.0
    logs = [math.log(max(v, 1e-12)) for v in curve]
    if s <= grid[0]:
        power = 1.0
        if len(grid) > 1:
            power = max(1.0, (logs[1] - logs[0]) / math.log(grid[1] / grid[0]))
        return math.exp(logs[0]) * (s / grid[0]) ** power
    for k in range(1, len(grid)):
        if s <= grid[k] + 1e-12:
            w = (s - grid[k - 1]) / (grid[k] - grid[k - 1])
            return math.exp(logs[k - 1] * (1 - w) + logs[k] * w)
    return math.inf


def allocate(kl_curves: list[list[float]], grid: list[float], mean: float, step: float = 0.01,
             max_deviation: float = 0.1) -> list[float]:
    """Per-layer sparsities averaging exactly `mean`, greedy on the per-layer KL curves (see module doc).

    `kl_curves[i][j]` is the next-token KL with only layer i sparsified at `grid[j]` (grid: increasing,
    without 0). Every layer stays within `mean ± max_deviation` and at most `max(grid)`.
    """
    if not kl_curves:
        raise ValueError("no layer curves to allocate from")
    if list(grid) != sorted(grid) or not grid or grid[0] <= 0:
        raise ValueError(f"grid must be increasing positive sparsities, got {grid}")
    if not 0.0 <= mean <= max(grid):
        raise ValueError(f"mean sparsity {mean} must be within [0, {max(grid)}] (the largest measured)")
    if max_deviation < 0:
        raise ValueError(f"max_deviation must be >= 0, got {max_deviation}")
    layers = len(kl_curves)
    low, high = max(0.0, mean - max_deviation), min(max(grid), mean + max_deviation)
    result = [low] * layers
    budget = (mean - low) * layers
    while budget > 1e-12:
        size = min(step, budget)
        room = [i for i in range(layers) if result[i] + size <= high + 1e-12]
        if not room:  # only rounding is left
            break
        rise = {i: _cost(kl_curves[i], grid, result[i] + size) - _cost(kl_curves[i], grid, result[i]) for i in room}
        chosen = min(room, key=rise.__getitem__)
        result[chosen] += size
        budget -= size
    return result
