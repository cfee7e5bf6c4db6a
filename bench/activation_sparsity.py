"""Activation sparsity of SmolLM2-135M on the shipped Wikipedia text, dense and 50% Wanda-pruned, on the CPU.

For each model, the `activation_profile` stage measures held-out perplexity with every FFN at a
uniform activation sparsity and with the per-layer allocation at the same mean (greedy on the KL
each layer alone causes, measured on calibration sequences); the critical sparsity is the largest
sparsity whose perplexity rises by at most 1% / 5%.
The pruned model is made by the `calibrate` and `prune` stages (Wanda, 50% unstructured, every
decoder Linear). Results go to `bench/results/activation_sparsity.json` (after each model) and the
figure to `bench/results/activation_sparsity.png`; a table is printed last.

    python bench/activation_sparsity.py            # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("bench.activation_sparsity")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "activation_sparsity.json"
FIGURE = ROOT / "bench" / "results" / "activation_sparsity.png"


def _profile(model_dir: Path, args, work: Path) -> tuple[dict, float]:
    from orchestrator.settings import get_settings
    from pipelines.recipe import ActivationProfileStage, DataSpec
    from pipelines.stage import StageContext
    from pipelines.stages.activation_profile import run

    spec = ActivationProfileStage(
        sparsities=args.sparsities, tolerances=args.tolerances, layer_sparsities=args.layer_sparsities,
        samples=args.samples, seq_len=args.seq_len, eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows,
        layer_samples=args.layer_samples, allocation_max_deviation=args.max_deviation, batch_size=args.batch_size,
    )
    ctx = StageContext(workdir=work, inputs={"model": model_dir}, data=DataSpec(), seed=args.seed,
                       cache_dir=get_settings().cache_dir)
    start = time.perf_counter()
    result = run(spec, ctx)
    report = json.loads(result.outputs["report"].read_text())
    report["uniform"].pop("thresholds")
    report["uniform"].pop("heldout_sparsity_per_layer")
    return report, time.perf_counter() - start


def _prune_wanda(model_dir: Path, args, work: Path) -> Path:
    from orchestrator.settings import get_settings
    from pipelines.recipe import CalibrateStage, DataSpec, WandaPrune
    from pipelines.stage import StageContext
    from pipelines.stages import calibrate, prune

    cache = get_settings().cache_dir
    cal = calibrate.run(CalibrateStage(samples=args.samples, seq_len=args.seq_len),
                        StageContext(workdir=work / "cal", inputs={"model": model_dir}, data=DataSpec(),
                                     seed=args.seed, cache_dir=cache))
    prune.run(WandaPrune(sparsity=0.5, export="none"),
              StageContext(workdir=work / "prune", inputs={"model": model_dir, **cal.outputs}, data=DataSpec(),
                           seed=args.seed, cache_dir=cache))
    return work / "prune" / "model"


def _table(rows: dict[str, dict]) -> str:
    tols = next(iter(rows.values()))["report"]["tolerances"]
    head = f"{'model':<12} {'weight sp':>9} {'dense ppl':>9}"
    for t in tols:
        head += f" {f'crit@{t:.0%} unif':>14} {f'crit@{t:.0%} alloc':>15}"
    lines = ["critical activation sparsity, nominal (calibration quantiles) | held-out (what the thresholds gave)",
             head]
    for name, row in rows.items():
        r = row["report"]
        line = f"{name:<12} {r['weight_sparsity']:>9.3f} {r['dense_perplexity']:>9.2f}"
        for t in tols:
            line += f" {r['uniform']['critical'][f'{t:g}']:>14.3f} {r['allocation']['critical'][f'{t:g}']:>15.3f}"
        lines.append(line)
        line = f"{'  held-out':<12} {'':>9} {'':>9}"
        for t in tols:
            line += (f" {r['uniform']['critical_heldout'][f'{t:g}']:>14.3f}"
                     f" {r['allocation']['critical_heldout'][f'{t:g}']:>15.3f}")
        lines.append(line)
    lines.append("")
    lines.append(f"{'model':<12} {'mean s':>6} {'held-out unif':>13} {'held-out alloc':>14} {'ppl uniform':>11} "
                 f"{'ppl per-layer':>13} {'uniform/dense':>13} {'alloc/dense':>11}")
    for name, row in rows.items():
        r = row["report"]
        for s, a in r["allocation"]["by_mean"].items():
            lines.append(f"{name:<12} {float(s):>6.2f} {r['uniform']['heldout_sparsity'][s]:>13.3f} "
                         f"{a['heldout_sparsity']:>14.3f} {a['uniform_perplexity']:>11.2f} {a['perplexity']:>13.2f} "
                         f"{a['uniform_perplexity'] / r['dense_perplexity']:>13.3f} "
                         f"{a['perplexity'] / r['dense_perplexity']:>11.3f}")
    return "\n".join(lines)


def _figure(rows: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for name, row in rows.items():
        r = row["report"]
        dense = r["dense_perplexity"]
        heldout = r["uniform"]["heldout_sparsity"]
        uni = sorted((heldout[s], p / dense) for s, p in r["uniform"]["perplexity"].items())
        by_mean = r["allocation"]["by_mean"]
        alloc = [(0.0, 1.0)] + sorted((a["heldout_sparsity"], a["perplexity"] / dense) for a in by_mean.values())
        left.plot(*zip(*uni, strict=True), "o-", label=f"{name}: uniform")
        left.plot(*zip(*alloc, strict=True), "s--", label=f"{name}: per-layer")
        crit = r["layers"]["critical"][f"{r['tolerances'][0]:g}"]
        right.plot(range(len(crit)), crit, "o-", label=f"{name}")
    for t in next(iter(rows.values()))["report"]["tolerances"]:
        left.axhline(1 + t, ls=":", color="grey", lw=0.8)
    left.set_yscale("log")
    left.set_xlabel("activation sparsity on held-out tokens (mean over FFNs)")
    left.set_ylabel("perplexity / dense perplexity of that model")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    tol = next(iter(rows.values()))["report"]["tolerances"][0]
    right.set_xlabel("decoder layer (sparsified alone)")
    right.set_ylabel(f"critical activation sparsity (+{tol:.0%} ppl)")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M, enwiki held-out: activation sparsity, dense vs 50% Wanda")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--layer-sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--layer-samples", type=int, default=8, help="calibration sequences for per-layer curves")
    parser.add_argument("--max-deviation", type=float, default=0.1, help="allocation: max |layer - mean| sparsity")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="Redraw the table and figure from the JSON.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import transformers

    from orchestrator.settings import get_settings
    from pipelines.sources import resolve_model

    if args.report_only:
        results = json.loads(RESULTS.read_text())
        _figure(results["models"], FIGURE)
        print(_table(results["models"]))
        return
    torch.manual_seed(args.seed)
    model_dir = resolve_model(args.model, get_settings().cache_dir)
    results = {
        "benchmark": "activation_sparsity",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(),
                   "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "config": vars(args),
        "models": {},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="act-sparsity-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        pruned = _prune_wanda(model_dir, args, work / "wanda")
        prune_s = time.perf_counter() - start
        for name, path in (("dense", model_dir), ("wanda-50%", pruned)):
            report, seconds = _profile(path, args, work / name)
            results["models"][name] = {"report": report, "profile_s": seconds}
            if name != "dense":
                results["models"][name]["prune_s"] = prune_s
            RESULTS.write_text(json.dumps(results, indent=2))
    _figure(results["models"], FIGURE)
    table = _table(results["models"])
    results["table"] = table
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"device: cpu ({results['device']['processor']}, {results['device']['torch_threads']} threads)")
    print(table)


if __name__ == "__main__":
    main()
