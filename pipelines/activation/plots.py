"""The activation-profile figure: perplexity vs activation sparsity, and each layer's critical sparsity.

matplotlib is imported when a figure is drawn (Agg canvas, no pyplot state), never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_profile(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """Two panels from a profile report: uniform vs per-layer curves, and the per-layer critical sparsity bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    dense = report["dense_perplexity"]
    heldout = report["uniform"]["heldout_sparsity"]  # x: what the thresholds gave on held-out tokens
    uniform = sorted((heldout[s], p) for s, p in report["uniform"]["perplexity"].items())
    left.plot([s for s, _ in uniform], [p for _, p in uniform], "o-", label="uniform (all layers at s)")
    allocated = sorted((row["heldout_sparsity"], row["perplexity"]) for row in report["allocation"]["by_mean"].values())
    if allocated:
        left.plot([0.0] + [s for s, _ in allocated], [dense] + [p for _, p in allocated], "s-",
                  label="per-layer allocation (same mean)")
    for tol in report["tolerances"]:
        left.axhline(dense * (1 + tol), ls="--", lw=0.8, color="grey")
        left.text(0.0, dense * (1 + tol), f" +{tol:.0%}", va="bottom", fontsize=8, color="grey")
    left.set_yscale("log")
    left.set_xlabel("activation sparsity of the FFN (down_proj input), held-out tokens")
    left.set_ylabel("held-out perplexity")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    layers = report["layers"]["critical"]
    width = 0.8 / len(layers)
    for k, (tol, values) in enumerate(layers.items()):
        xs = [i + (k - (len(layers) - 1) / 2) * width for i in range(len(values))]
        right.bar(xs, values, width=width, label=f"+{float(tol):.0%} perplexity")
    right.set_xlabel("decoder layer (sparsified alone)")
    right.set_ylabel("critical activation sparsity")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"activation sparsity (weight sparsity {report['weight_sparsity']:.0%})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
