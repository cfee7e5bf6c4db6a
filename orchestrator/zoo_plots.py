"""The nightly zoo report's four PNG figures, drawn from plain numbers.

Each function takes already-extracted series (no dataclasses of the report, no database) and returns
the PNG bytes, or None when there is nothing to draw: the report then prints a short "no data" note.
Figures are `matplotlib.figure.Figure` objects on an Agg canvas: no pyplot, so no global figure state
is touched and nothing leaks between nights rendered in one process. matplotlib is imported when a
figure is drawn, never at import time.

Labels come from zoo files and recipes, which are hostile input: `label()` neutralises the characters
matplotlib interprets (`$` starts mathtext, which raises on bad syntax; a leading `_` hides a legend
entry) and truncates very long names so that a figure keeps its size.
"""

from __future__ import annotations

import io
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

DPI = 90
LEGEND_MAX = 20  # past this many series a legend is longer than the plot; the tables carry the names
STAGE_BARS_MAX = 60  # the stage-time figure shows the longest jobs first, at most this many


def label(text: str, limit: int = 48) -> str:
    """A string safe to hand to matplotlib as literal text, cut in the middle past `limit` characters.

    The middle goes because both ends carry meaning: `org/model` in front, `/recipe (reused)` behind.
    """
    text = " ".join(str(text).split())
    if len(text) > limit:
        head = (limit - 1) // 2
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    text = text.replace("$", r"\$")  # an escaped dollar is drawn as itself, never as mathtext
    return " " + text if text.startswith("_") else text


def finite(value: float | None) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort `4096x11008.16` after `4096x4096.16`: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # No "Software" chunk: the page promises no external reference, even inside an image.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _log_if_wide(ax: Any, values: Sequence[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")


def _legend(fig: Any, count: int) -> None:
    """One legend beside the axes (never over the data), when it stays readable."""
    if 0 < count <= LEGEND_MAX:
        fig.legend(fontsize=7, loc="outside right upper")


def perplexity_vs_sparsity(series: Mapping[str, Sequence[tuple[float, float, str]]]) -> bytes | None:
    """One line per model through its jobs' (sparsity, perplexity), each point tagged with its recipe.

    `series` maps a model to `(sparsity, perplexity, point label)` triples; a dense reference point is
    simply a triple at sparsity 0. Non-finite values (a diverged model's perplexity is inf) are left out.
    """
    cleaned = {model: sorted((s, p, name) for s, p, name in points if finite(s) and finite(p))
               for model, points in series.items()}
    cleaned = {model: points for model, points in cleaned.items() if points}
    if not cleaned:
        return None
    fig = _new_figure(10.0, 4.8)
    ax = fig.subplots()
    for model, points in sorted(cleaned.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        (line,) = ax.plot(xs, ys, "o-", ms=4, lw=1.2, label=label(model))
        if len(cleaned) <= LEGEND_MAX:
            for x, y, name in points:
                ax.annotate(label(name, 20), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                            color=line.get_color())
    _log_if_wide(ax, [p[1] for points in cleaned.values() for p in points])
    ax.set_xlabel("weight sparsity")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity vs sparsity ({len(cleaned)} models)")
    ax.grid(alpha=0.3)
    _legend(fig, len(cleaned))
    return _png(fig)


def metric_trends(trends: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                  night_labels: Sequence[str]) -> bytes | None:
    """One panel per metric, one line per (model, recipe): its change in % since its first night shown.

    Relative change puts a 7B model and a tiny one on one scale and makes a +3% step visible; the
    report's tables carry the absolute values. `trends` maps a metric to series label to
    `(night index, value)` pairs, the index pointing into `night_labels` (oldest first). A series whose
    first value is 0 has no relative change and is left out. Returns None with fewer than two nights:
    a first night has no trend.
    """
    if len(night_labels) < 2:
        return None
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric, by_series in trends.items():
        for name, points in by_series.items():
            kept = sorted((i, v) for i, v in points if finite(v))
            if kept and kept[0][1] != 0:
                panels.setdefault(metric, {})[name] = [(i, 100.0 * (v / kept[0][1] - 1.0)) for i, v in kept]
    if not panels:
        return None
    from matplotlib import colormaps

    names = sorted({name for by_series in panels.values() for name in by_series})
    cmap = colormaps["tab20" if len(names) > 10 else "tab10"]
    colors = {name: cmap(k % cmap.N) for k, name in enumerate(names)}  # a series keeps its colour in every panel
    fig = _new_figure(10.0, 2.4 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    lines: dict[str, Any] = {}
    for ax, (metric, by_series) in zip(axes, sorted(panels.items()), strict=True):
        for name, points in sorted(by_series.items()):
            (lines[name],) = ax.plot([i for i, _ in points], [v for _, v in points], "o-", ms=3, lw=1.1,
                                     color=colors[name])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel(label(metric, 28) + "\n% vs first night", fontsize=8)
        ax.grid(alpha=0.3)
    if len(names) <= LEGEND_MAX:
        fig.legend([lines[n] for n in names], [label(n, 40) for n in names], fontsize=7, loc="outside right upper")
    axes[-1].set_xticks(range(len(night_labels)), [label(n, 16) for n in night_labels], rotation=30, ha="right",
                        fontsize=7)
    axes[0].set_title(f"key metrics over the last {len(night_labels)} nights (change since first shown)")
    return _png(fig)


def kernel_speedups(by_shape: Mapping[str, Sequence[float]]) -> bytes | None:
    """Per layer shape, each job's tuned speedup over dense (dots) and their median (bar); 1.0 is dense."""
    cleaned = {shape: [v for v in values if finite(v)] for shape, values in by_shape.items()}
    cleaned = {shape: values for shape, values in cleaned.items() if values}
    if not cleaned:
        return None
    shapes = sorted(cleaned, key=natural_key)
    fig = _new_figure(10.0, min(0.32 * len(shapes) + 1.4, 30.0))
    ax = fig.subplots()
    medians = [statistics.median(cleaned[s]) for s in shapes]
    ax.barh(range(len(shapes)), medians, color="#9ecae1", label="median over jobs")
    for row, shape in enumerate(shapes):
        values = cleaned[shape]
        offsets = [(k - (len(values) - 1) / 2) * min(0.6 / max(len(values), 1), 0.15) for k in range(len(values))]
        ax.plot(values, [row + o for o in offsets], "o", ms=3, color="#08519c",
                label="one job" if row == 0 else None)
    ax.axvline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_yticks(range(len(shapes)), [label(s, 28) for s in shapes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tuned kernel speedup over dense (x)")
    ax.set_title("tuned 2:4 kernel speedup per layer shape (out x in . tokens)")
    ax.grid(alpha=0.3, axis="x")
    _legend(fig, 2)
    return _png(fig)


def stage_times(jobs: Sequence[tuple[str, Mapping[str, float]]]) -> bytes | None:
    """Stacked horizontal bars, one per job, one colour per stage: where the night's time goes.

    `jobs` holds `(job label, {stage: seconds})`, stages in run order. The longest jobs come first and
    at most STAGE_BARS_MAX are drawn (the title says how many were left out).
    """
    rows = [(name, {s: float(t) for s, t in stages.items() if finite(t) and t >= 0}) for name, stages in jobs]
    rows = [(name, stages) for name, stages in rows if stages]
    if not rows:
        return None
    rows.sort(key=lambda row: -sum(row[1].values()))
    shown = rows[:STAGE_BARS_MAX]
    order: list[str] = []
    for _, stages in sorted(rows, key=lambda row: -len(row[1])):  # the longest recipe sets the run order
        order += [s for s in stages if s not in order]
    fig = _new_figure(10.0, min(0.3 * len(shown) + 1.6, 30.0))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(order))]
    lefts = [0.0] * len(shown)
    for stage, color in zip(order, colors, strict=True):
        widths = [stages.get(stage, 0.0) for _, stages in shown]
        ax.barh(range(len(shown)), widths, left=lefts, color=color, label=label(stage, 24),
                hatch="//" if order.index(stage) >= 10 else None)
        lefts = [a + b for a, b in zip(lefts, widths, strict=True)]
    ax.set_yticks(range(len(shown)), [label(name, 40) for name, _ in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("stage wall time (s)")
    left_out = len(rows) - len(shown)
    ax.set_title("stage time per job" + (f" ({len(shown)} longest; {left_out} more not shown)" if left_out else ""))
    ax.grid(alpha=0.3, axis="x")
    _legend(fig, len(order))
    return _png(fig)
