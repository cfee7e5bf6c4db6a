"""Activation profile: how much FFN activation sparsity each layer tolerates, and a model that uses it.

On the calibration text, a histogram of |h| (h: the input of `down_proj` of each gated FFN) per
decoder layer gives per-layer thresholds for any sparsity s (the s-quantile). On held-out windows:

- uniform curve: perplexity with every layer at s, for each s of `sparsities` (and the sparsity the
  thresholds really give on these held-out tokens);
- per-layer curves (on the first `layer_samples` calibration sequences, so the held-out text stays
  unseen): perplexity and next-token KL divergence from the dense model with one layer at a time at
  each s of `layer_sparsities`; each layer's critical sparsity;
- allocation: per-layer sparsities with the same mean, greedy on the per-layer KL curves within
  `allocation_max_deviation` of the mean, measured against uniform at each mean of `allocate_at`;
- critical sparsity: the largest s whose perplexity rises by at most each tolerance (uniform and
  allocated), interpolated between measured points, both at the nominal (calibration) sparsity and
  at the sparsity the thresholds really gave on the held-out tokens (`critical_heldout`): the
  latter is the fair comparison, since thresholds carry over to new text slightly differently per
  layer.

The stage profiles whatever model it is given: after `prune` it is the weight-pruned model, whose
weight sparsity the report records. With `export`, a copy of the model carries per-layer thresholds
in `config.activation_sparsity` (see `pipelines.activation.apply`). Outputs: `report`
(report.json), `plot` (activation_profile.png) and, with export, `model`. Recipe sample::

    - stage: activation_profile
      sparsities: [0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
      tolerances: [0.01, 0.05]
      layer_sparsities: [0.5, 0.7, 0.9]
      eval_windows: 16
      export: true
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipelines.activation.allocation import allocate, critical_sparsity
from pipelines.activation.apply import gated_mlps, write_config
from pipelines.activation.measure import check_restart, collect_histograms, layer_curves, perplexity_at
from pipelines.activation.plots import plot_profile
from pipelines.activation.stats import threshold_for, thresholds_for
from pipelines.data import calibration_samples, eval_windows
from pipelines.modelio import load_model, load_tokenizer, save_model
from pipelines.recipe import ActivationProfileStage
from pipelines.sources import describe, load_text
from pipelines.stage import Metric, StageContext, StageResult
from pipelines.stages.evaluate import sparsity_report

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PLOT_FILE = "activation_profile.png"


def tolerance_label(tolerance: float) -> str:
    """0.01 -> '1pct' (the suffix of the critical-sparsity metrics)."""
    return f"{tolerance * 100:g}pct"


def _key(s: float) -> str:
    return f"{s:g}"


def run(spec: ActivationProfileStage, ctx: StageContext) -> StageResult:
    model_dir = ctx.require("model")
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_samples(tokenizer, load_text(ctx.data.calibration, "calibration", ctx.cache_dir),
                                spec.samples, spec.seq_len, ctx.seed)
    windows = eval_windows(tokenizer, load_text(ctx.data.evaluation, "evaluation", ctx.cache_dir),
                           spec.eval_seq_len, spec.eval_windows)
    model = load_model(model_dir, device=ctx.device)
    n_layers = len(gated_mlps(model))
    weight_sparsity = sparsity_report(model)["total"]["sparsity"]

    ctx.progress(0, 4, "calibration histograms")
    histograms = collect_histograms(model, calib, spec.batch_size)
    grid = spec.layer_sparsities or [s for s in spec.sparsities if s > 0]
    means = spec.allocate_at or [s for s in spec.sparsities if 0 < s <= max(grid)]

    ctx.progress(1, 4, "uniform curve")
    uniform: dict[float, tuple[float, list[float], list[float]]] = {}
    for s in sorted(set(spec.sparsities) | set(means) | {0.0}):
        thresholds = [threshold_for(histograms[i], s) for i in range(n_layers)]
        ppl, achieved = perplexity_at(model, windows, thresholds, spec.batch_size)
        uniform[s] = (ppl, achieved, thresholds)
        logger.info("uniform activation sparsity %.2f: perplexity %.3f (held-out %.3f)", s, ppl,
                    sum(achieved) / n_layers)
    dense_ppl = uniform[0.0][0]

    ctx.progress(2, 4, "per-layer curves")
    layer_samples = calib[: spec.layer_samples]
    check_restart(model, layer_samples[:1])
    layer_thresholds = [[threshold_for(histograms[i], s) for s in grid] for i in range(n_layers)]
    curves = layer_curves(model, layer_samples, layer_thresholds, spec.batch_size)
    layer_critical = {
        _key(t): [critical_sparsity(list(zip(grid, c, strict=True)), curves.dense_perplexity, t)
                  for c in curves.perplexity]
        for t in spec.tolerances
    }

    ctx.progress(3, 4, "per-layer allocation")
    by_mean: dict[str, dict[str, Any]] = {}
    for mean in means:
        alloc = allocate(curves.kl, grid, mean, max_deviation=spec.allocation_max_deviation)
        ppl, achieved = perplexity_at(model, windows, thresholds_for(histograms, alloc), spec.batch_size)
        by_mean[_key(mean)] = {"perplexity": ppl, "uniform_perplexity": uniform[mean][0], "layer_sparsities": alloc,
                               "heldout_sparsity": sum(achieved) / n_layers,
                               "uniform_heldout_sparsity": sum(uniform[mean][1]) / n_layers}
        logger.info("mean activation sparsity %.2f: per-layer %.3f vs uniform %.3f", mean, ppl, uniform[mean][0])

    uniform_points = [(s, v[0]) for s, v in uniform.items()]
    alloc_points = [(float(m), row["perplexity"]) for m, row in by_mean.items()]
    uniform_heldout = [(sum(v[1]) / n_layers, v[0]) for v in uniform.values()]
    alloc_heldout = [(row["heldout_sparsity"], row["perplexity"]) for row in by_mean.values()]
    report: dict[str, Any] = {
        "model": str(model_dir),
        "weight_sparsity": weight_sparsity,
        "dense_perplexity": dense_ppl,
        "tolerances": spec.tolerances,
        "calibration": {"source": describe(ctx.data.calibration), "samples": spec.samples, "seq_len": spec.seq_len},
        "eval": {"source": describe(ctx.data.evaluation), "windows": windows.shape[0], "seq_len": spec.eval_seq_len},
        "uniform": {
            "perplexity": {_key(s): v[0] for s, v in uniform.items()},
            "heldout_sparsity": {_key(s): sum(v[1]) / n_layers for s, v in uniform.items()},
            "heldout_sparsity_per_layer": {_key(s): v[1] for s, v in uniform.items()},
            "thresholds": {_key(s): v[2] for s, v in uniform.items()},
            "critical": {_key(t): critical_sparsity(uniform_points, dense_ppl, t) for t in spec.tolerances},
            "critical_heldout": {_key(t): critical_sparsity(uniform_heldout, dense_ppl, t) for t in spec.tolerances},
        },
        "layers": {"grid": grid, "samples": int(layer_samples.shape[0]), "text": "calibration",
                   "dense_perplexity": curves.dense_perplexity, "perplexity": curves.perplexity, "kl": curves.kl,
                   "critical": layer_critical},
        "allocation": {
            "method": "greedy on per-layer KL curves",
            "max_deviation": spec.allocation_max_deviation,
            "by_mean": by_mean,
            "critical": {_key(t): critical_sparsity(alloc_points, dense_ppl, t) for t in spec.tolerances},
            "critical_heldout": {_key(t): critical_sparsity(alloc_heldout, dense_ppl, t) for t in spec.tolerances},
        },
        "export": None,
    }
    outputs: dict[str, Path] = {}
    notes: list[str] = []
    if spec.export:
        outputs["model"], report["export"] = _export(spec, ctx, model, model_dir, histograms, curves, grid, report)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    outputs["report"] = ctx.workdir / REPORT_FILE
    outputs["report"].write_text(json.dumps(report, indent=2))
    try:
        outputs["plot"] = plot_profile(report, ctx.workdir / PLOT_FILE)
    except ImportError as error:
        notes.append(f"activation profile plot skipped: {error}")
    ctx.progress(4, 4, "done")
    return StageResult(outputs=outputs, metrics=_metrics(report, spec), summary=_summary(report), notes=notes)


def _export(spec, ctx, model, model_dir, histograms, curves, grid, report) -> tuple[Path, dict[str, Any]]:
    """Write the model with per-layer thresholds in its config; returns its path and the report entry."""
    table = report["allocation" if spec.export_allocation == "per_layer" else "uniform"]["critical"]
    mean = spec.export_sparsity if spec.export_sparsity is not None else table[_key(spec.tolerances[0])]
    mean = min(mean, max(grid)) if spec.export_allocation == "per_layer" else mean
    n_layers = histograms.shape[0]
    layer_sparsities = (allocate(curves.kl, grid, mean, max_deviation=spec.allocation_max_deviation)
                        if spec.export_allocation == "per_layer" else [mean] * n_layers)
    thresholds = thresholds_for(histograms, layer_sparsities)
    write_config(model, thresholds, mean, layer_sparsities, spec.export_allocation)
    path = save_model(model, model_dir, Path(ctx.workdir) / "model")
    return path, {"sparsity": mean, "allocation": spec.export_allocation, "layer_sparsities": layer_sparsities,
                  "thresholds": thresholds}


def _metrics(report: dict[str, Any], spec: ActivationProfileStage) -> list[Metric]:
    metrics = [Metric("act_dense_ppl", report["dense_perplexity"]),
               Metric("weight_sparsity", report["weight_sparsity"])]
    for t in spec.tolerances:
        metrics.append(Metric(f"act_critical_sparsity.{tolerance_label(t)}", report["uniform"]["critical"][_key(t)]))
        metrics.append(Metric(f"act_alloc_critical_sparsity.{tolerance_label(t)}",
                              report["allocation"]["critical"][_key(t)]))
        for name in ("uniform", "allocation"):
            metrics.append(Metric(f"act_{'alloc_' if name == 'allocation' else ''}critical_heldout."
                                  f"{tolerance_label(t)}", report[name]["critical_heldout"][_key(t)]))
    for s, ppl in report["uniform"]["perplexity"].items():
        metrics.append(Metric(f"act_ppl.{s}", ppl))
        metrics.append(Metric(f"act_heldout_sparsity.{s}", report["uniform"]["heldout_sparsity"][s]))
    for s, row in report["allocation"]["by_mean"].items():
        metrics.append(Metric(f"act_alloc_ppl.{s}", row["perplexity"]))
    for i, value in enumerate(report["layers"]["critical"][_key(spec.tolerances[0])]):
        metrics.append(Metric(f"act_layer_critical.{i}", value))
    if report["export"] is not None:
        metrics.append(Metric("act_export_sparsity", report["export"]["sparsity"]))
    return metrics


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "dense_perplexity": report["dense_perplexity"],
        "weight_sparsity": report["weight_sparsity"],
        "critical_sparsity": report["uniform"]["critical"],
        "allocated_critical_sparsity": report["allocation"]["critical"],
        "critical_heldout": report["uniform"]["critical_heldout"],
        "allocated_critical_heldout": report["allocation"]["critical_heldout"],
        "export_sparsity": None if report["export"] is None else report["export"]["sparsity"],
    }
