"""How much of the 2:4 pruning gap sparse fine-tuning recovers, with and without distillation.

SmolLM2-135M (builtin) is calibrated and pruned 2:4 (SparseGPT by default) through the real stages, then
fine-tuned twice from the same pruned model with the same steps, data and schedule: CE only, and
CE + KD from the dense model. Every model is evaluated on the same held-out windows. Checks first
(no pruned weight may change, exactly), then reports: perplexities, the fraction of the
dense-to-pruned gap recovered, (ppl_pruned - ppl_ft) / (ppl_pruned - ppl_dense), and wall times.

    python bench/finetune_recovery.py                    # ~10-15 min on 2 CPU cores
    python bench/finetune_recovery.py --steps 4 --eval-windows 2   # smoke run

Writes `bench/results/finetune_recovery.json` with device, versions, the command and the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from orchestrator.settings import get_settings
from pipelines.modelio import load_model
from pipelines.recipe import CalibrateStage, DataSpec, EvaluateStage, FinetuneStage, prune_stage
from pipelines.sources import resolve_model
from pipelines.stage import StageContext
from pipelines.stages import get_stage

logger = logging.getLogger("bench.finetune_recovery")


def changed_pruned_weights(pruned_dir: Path, tuned_dir: Path) -> tuple[int, int]:
    """(pruned weights that are non-zero after fine-tuning, pruned weights) over all decoder Linears."""
    from pipelines.finetune.masking import capture_masks

    pruned, tuned = load_model(pruned_dir), dict(load_model(tuned_dir).named_modules())
    changed = total = 0
    for name, mask in capture_masks(pruned).items():
        changed += int(torch.count_nonzero(tuned[name].weight[mask]))
        total += int(mask.sum())
    return changed, total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sparsegpt", "wanda", "magnitude"], default="sparsegpt",
                        help="How the model is pruned to 2:4 before fine-tuning.")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta-kd", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparseflow-bench-recovery"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune_recovery.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cache = get_settings().cache_dir
    data = DataSpec(calibration="builtin:enwiki", evaluation="builtin:enwiki")
    times: dict[str, float] = {}

    def stage(kind: str, spec, name: str, **inputs: Path):
        ctx = StageContext(workdir=args.workdir / name, inputs={"base_model": base, **inputs}, data=data,
                           seed=0, cache_dir=cache)
        started = time.perf_counter()
        result = get_stage(kind)(spec, ctx)
        times[name] = round(time.perf_counter() - started, 1)
        logger.info("%s done in %.1f s", name, times[name])
        return result

    started = time.perf_counter()
    base = resolve_model("builtin:smollm2-135m", cache)
    calibration = stage("calibrate", CalibrateStage(samples=args.calib_samples, seq_len=256), "calibrate",
                        model=base).outputs["calibration"]
    prune = prune_stage(method=args.method, pattern="2:4", export="none")
    pruned = stage("prune", prune, "prune", model=base, calibration=calibration).outputs["model"]

    evaluate = EvaluateStage(seq_len=args.eval_seq_len, max_windows=args.eval_windows, compare_dense=True)
    pruned_eval = stage("evaluate", evaluate, "evaluate_pruned", model=pruned).summary
    dense_ppl, pruned_ppl = pruned_eval["dense_perplexity"], pruned_eval["perplexity"]

    rows = []
    for label, beta in (("ce", 0.0), ("ce+kd", args.beta_kd)):
        spec = FinetuneStage(steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 12),
                             batch_size=args.batch_size, seq_len=args.seq_len, beta_kd=beta,
                             temperature=args.temperature)
        tuned = stage("finetune", spec, f"finetune_{label}", model=pruned)
        ppl = stage("evaluate", evaluate, f"evaluate_{label}", model=tuned.outputs["model"]).summary["perplexity"]
        changed, masked = changed_pruned_weights(pruned, tuned.outputs["model"])
        if changed:
            raise SystemExit(f"{label}: {changed} pruned weights changed during fine-tuning")
        losses = [m.value for m in tuned.metrics if m.name == "loss_ce"]
        rows.append({
            "run": label,
            "beta_kd": beta,
            "perplexity": ppl,
            "gap_recovered": (pruned_ppl - ppl) / (pruned_ppl - dense_ppl),
            "pruned_weights": masked,
            "pruned_weights_changed": changed,
            "finetune_s": times[f"finetune_{label}"],
            "train_tokens": args.steps * args.batch_size * args.seq_len,
            "loss_ce_first5": sum(losses[:5]) / len(losses[:5]),
            "loss_ce_last5": sum(losses[-5:]) / len(losses[-5:]),
        })

    result = {
        "benchmark": "finetune_recovery",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": "builtin:smollm2-135m",
        "pruning": f"{args.method} 2:4 via pipelines.stages.prune ({args.calib_samples} x 256 calibration tokens)",
        "eval": {"split": "builtin:enwiki evaluation", "windows": args.eval_windows, "seq_len": args.eval_seq_len},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dense_perplexity": dense_ppl,
        "pruned_perplexity": pruned_ppl,
        "runs": rows,
        "times_s": times,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"dense {dense_ppl:.2f}  pruned 2:4 {pruned_ppl:.2f}")
    for row in rows:
        print(f"{row['run']:6s} ppl {row['perplexity']:.2f}  gap recovered {row['gap_recovered']:.1%}  "
              f"pruned weights changed {row['pruned_weights_changed']}  {row['finetune_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
