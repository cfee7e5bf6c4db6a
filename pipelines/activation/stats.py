"""Per-layer distribution of FFN activation magnitudes, and the thresholds that give a target sparsity.

The statistic is a histogram of log10 |h| (h: the input of `down_proj`) over every calibration token
and neuron of a layer: fixed log-spaced bins, so it streams over batches in constant memory and a
quantile is read off it for any sparsity afterwards. Magnitudes below `LOG10_MIN` (exact zeros
included) fall into the first bin, above `LOG10_MAX` into the last. A quantile is interpolated
inside its bin in log space; with 8192 bins over 16 decades a bin spans 0.45% of magnitude.

Pure tensor functions: make, accumulate, read thresholds; no model, hooks or I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG10_MIN = -12.0
LOG10_MAX = 4.0
BINS = 8192


def new_histograms(layers: int, bins: int = BINS) -> Tensor:
    """Empty histograms, one row per layer: float64 [layers, bins]."""
    return torch.zeros(layers, bins, dtype=torch.float64)


def accumulate(histogram: Tensor, h: Tensor) -> None:
    """Add every entry of `h` (any shape) to one layer's `histogram` [bins] in place."""
    bins = histogram.numel()
    logs = h.detach().float().abs().clamp_(min=10.0**LOG10_MIN).log10_().clamp_(LOG10_MIN, LOG10_MAX)
    histogram += torch.histc(logs.flatten(), bins=bins, min=LOG10_MIN, max=LOG10_MAX).to("cpu", torch.float64)


def threshold_for(histogram: Tensor, sparsity: float) -> float:
    """The magnitude t such that a fraction `sparsity` of the recorded |h| lies below t; 0 for sparsity 0."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return 0.0
    total = float(histogram.sum())
    if total == 0:
        raise ValueError("the histogram is empty: no activations were recorded")
    cdf = torch.cumsum(histogram, 0) / total
    b = int(torch.searchsorted(cdf, torch.tensor([sparsity], dtype=cdf.dtype)).item())
    b = min(b, histogram.numel() - 1)
    below = float(cdf[b - 1]) if b > 0 else 0.0
    inside = float(histogram[b]) / total
    frac = (sparsity - below) / inside if inside > 0 else 0.0
    width = (LOG10_MAX - LOG10_MIN) / histogram.numel()
    return float(10.0 ** (LOG10_MIN + (b + min(max(frac, 0.0), 1.0)) * width))


def thresholds_for(histograms: Tensor, sparsities: list[float]) -> list[float]:
    """One threshold per layer, each layer at its own sparsity."""
    if len(sparsities) != histograms.shape[0]:
        raise ValueError(f"{len(sparsities)} sparsities for {histograms.shape[0]} layers")
    return [threshold_for(histograms[i], s) for i, s in enumerate(sparsities)]


def fraction_below(h: Tensor, threshold: float) -> tuple[int, int]:
    """(entries with |h| < threshold, entries): the sparsity a threshold gives on `h`."""
    return int((h.detach().abs() < threshold).sum()), h.numel()
