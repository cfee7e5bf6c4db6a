"""Projected wall time of a streaming SparseGPT prune of a whole Llama-3-70B (and 405B), from the 70B-slice bench.

Reads `pruning_70b_slice.json` (bench/pruning_70b_slice.py) and, per pattern, splits the measured
time of a middle layer into its parts: the SparseGPT solves (`solve_layer_s`, CUDA events around
each group's prune), the shard read and write (`read_layer_s`, `write_layer_s`), and the rest
(forward passes and x xᵀ accumulation: `forward_s`). Then, as docs/scaling.md states:

- a whole model costs `setup + layers x layer time` (every layer of a model has the same shape; the
  last one, which propagates nothing, is counted as a full one);
- on N GPUs the solves and forwards of a layer are divided by N x efficiency (the split is not built
  yet: this is the target it would have to reach), the read and write are not (one host, one disk);
- 405B: each part is scaled by how its work grows with the shapes: forwards by the weight count
  plus sum(cols²) of the x xᵀ accumulations, I/O by the layer's bytes, and solves by a range: from
  the column count (the column loop bound by its per-column kernel launches) to sum(rows x cols² +
  cols³/3) (bound by arithmetic: the block updates and the Cholesky). 405B cells show "low-high".

    python bench/scaling_projection.py bench/results/pruning_70b_slice.json   # a markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # hidden, MLP, KV width (8 KV heads x 128), decoder layers
    "70B": {"hidden": 8192, "mlp": 28672, "kv": 1024, "layers": 80},
    "405B": {"hidden": 16384, "mlp": 53248, "kv": 1024, "layers": 126},
}
GPUS = (1, 2, 8)
EFFICIENCY = {1: 1.0, 2: 0.9, 8: 0.75}
"""Assumed parallel efficiency of the (unbuilt) multi-GPU split: 2 GPUs at issue 14's goal (1.8x), 8 at 0.75."""


def linears(shape: dict) -> list[tuple[int, int]]:
    """(rows, cols) of each solve of one decoder layer, Linears sharing an input stacked (q/k/v, gate/up)."""
    h, m, kv = shape["hidden"], shape["mlp"], shape["kv"]
    return [(h + 2 * kv, h), (h, h), (2 * m, h), (h, m)]


def work(shape: dict) -> dict[str, float]:
    """Relative work of one layer's parts (arbitrary units, compared between shapes)."""
    solves = linears(shape)
    return {
        "solve": sum(rows * cols**2 + cols**3 / 3 for rows, cols in solves),
        "columns": sum(cols for _, cols in solves),
        "forward": sum(rows * cols for rows, cols in solves) + sum(cols**2 for _, cols in solves),
        "io": sum(rows * cols for rows, cols in solves),
    }


def layer_parts(row: dict) -> dict[str, float]:
    """Seconds of a middle layer: solve, read + write, forward (the rest)."""
    middle = slice(1, -1) if len(row["layer_s"]) > 2 else slice(-1, None)
    layer = _mean(row["layer_s"][middle])
    solve = _mean(row["solve_layer_s"][middle])
    io = _mean(row["read_layer_s"][middle]) + _mean(row["write_layer_s"][middle])
    return {"layer": layer, "solve": solve, "io": io, "forward": max(layer - solve - io, 0.0),
            "setup": max(row["layer_s"][0] - layer, 0.0)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def measured_shape(dims: dict) -> dict:
    """The bench's layer shape in `SHAPES`' terms (head dim 128 as in every Llama-3)."""
    head_dim = dims["hidden"] // dims["heads"]
    return {"hidden": dims["hidden"], "mlp": dims["mlp"], "kv": dims["kv_heads"] * head_dim, "layers": dims["layers"]}


def project(row: dict, dims: dict) -> dict[str, dict[int, tuple[float, float]]]:
    """Projected (low, high) seconds for each model and GPU count from one measured pattern row (same
    calibration tokens); low scales the solves by their columns, high by their arithmetic."""
    parts = layer_parts(row)
    base = work(measured_shape(dims))
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for name, shape in SHAPES.items():
        scale = {key: work(shape)[key] / base[key] for key in base}
        forward, io = parts["forward"] * scale["forward"], parts["io"] * scale["io"]
        bounds = [parts["solve"] * scale["columns"], parts["solve"] * scale["solve"]]
        out[name] = {n: tuple(parts["setup"] + shape["layers"] * (io + (solve + forward) / (n * EFFICIENCY[n]))
                              for solve in sorted(bounds)) for n in GPUS}
    return out


def _hours(bounds: tuple[float, float]) -> str:
    low, high = (x / 3600 for x in bounds)
    return f"{low:.2f} h" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f} h"


def table(report: dict) -> str:
    dims = report["dims"]
    lines = [f"Measured on {report['device']}: {dims['layers']} layers of hidden {dims['hidden']}, MLP {dims['mlp']}; "
             f"projected for the same {dims['samples']} x {dims['seq_len']} calibration tokens.", "",
             "| pattern | s/layer (solve / fwd / I/O) | " + " | ".join(
                 f"{m} on {n} GPU{'s' if n > 1 else ''}" for m in SHAPES for n in GPUS) + " |",
             "|---" * (2 + len(SHAPES) * len(GPUS)) + "|"]
    for row in report["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['pattern']} | {row.get('status')} |" + " |" * (len(SHAPES) * len(GPUS)))
            continue
        parts, projected = layer_parts(row), project(row, report["dims"])
        cells = [_hours(projected[m][n]) for m in SHAPES for n in GPUS]
        lines.append(f"| {row['pattern']} | {parts['layer']:.1f} ({parts['solve']:.1f} / {parts['forward']:.1f} / "
                     f"{parts['io']:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    sys.stdout.write(table(json.loads(args.results.read_text())) + "\n")


if __name__ == "__main__":
    main()
