"""Does sparse fine-tuning's recovery carry over to text of another kind, and which training text makes it?

SmolLM2-135M (builtin) is calibrated on the Wikipedia excerpt and pruned 2:4 (SparseGPT) through the
real stages. The pruned model is then fine-tuned (cross-entropy, the stage's defaults otherwise) for
each training text and each step count of the curve, and every model (dense, pruned, each fine-tune)
is evaluated on the held-out part of every evaluation text: `builtin:enwiki` (the training text's own
kind) and `builtin:news` (Australian news, another kind). Reported per evaluation text: perplexity and
the fraction of the dense-to-pruned gap recovered, (ppl_pruned - ppl_ft) / (ppl_pruned - ppl_dense).

Training texts:
- `wiki`: the Wikipedia excerpt's calibration part, as a recipe without its own data does;
- `mix`: the news corpus's calibration part and as many characters of Wikipedia calibration articles,
  written to one directory of .txt files (how a user mixes texts: `data.calibration: <that dir>`).
The held-out articles of both texts never enter training.

    python bench/finetune_transfer.py                         # ~40 min on 2 CPU cores
    python bench/finetune_transfer.py --steps 2 --eval-windows 1 --setups wiki   # smoke run
    python bench/finetune_transfer.py --reuse --runs mix:24 mix:48 wiki:24     # finish or re-report a run

Writes `bench/results/finetune_transfer.json` (device, versions, command, load, table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.finetune_recovery import changed_pruned_weights  # noqa: E402
from orchestrator.settings import get_settings  # noqa: E402
from pipelines.recipe import CalibrateStage, DataSpec, EvaluateStage, FinetuneStage, prune_stage  # noqa: E402
from pipelines.sources import load_text, resolve_model  # noqa: E402
from pipelines.stage import StageContext  # noqa: E402
from pipelines.stages import get_stage  # noqa: E402

logger = logging.getLogger("bench.finetune_transfer")
EVAL_TEXTS = ("builtin:enwiki", "builtin:news")


def write_mix(out: Path, cache: Path) -> Path:
    """A directory holding the news calibration part and as many characters of Wikipedia calibration text."""
    news = load_text("builtin:news", "calibration", cache)
    wiki_articles = load_text("builtin:enwiki", "calibration", cache).split("\n\n")
    wiki, size = [], 0
    for article in wiki_articles:
        if size >= len(news):
            break
        wiki.append(article)
        size += len(article)
    out.mkdir(parents=True, exist_ok=True)
    (out / "news.txt").write_text(news)
    (out / "wiki.txt").write_text("\n\n".join(wiki))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[48, 144], help="The curve's step counts.")
    parser.add_argument("--setups", nargs="+", choices=["wiki", "mix"], default=["wiki", "mix"])
    parser.add_argument("--runs", nargs="+", default=None, metavar="SETUP:STEPS",
                        help="Exactly these fine-tunes (e.g. mix:24 mix:48 wiki:24) instead of every setup x steps.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparseflow-bench-transfer"))
    parser.add_argument("--reuse", action="store_true",
                        help="Reuse the stages an earlier run of the same settings finished in --workdir.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune_transfer.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cache = get_settings().cache_dir
    started = time.perf_counter()
    times: dict[str, float] = {}
    loads: list[float] = []

    def stage(kind: str, spec, name: str, data: DataSpec, **inputs: Path):
        done = args.workdir / name / "stage_result.json"
        if args.reuse and done.is_file():  # an earlier run of this bench finished this stage with these settings
            saved = json.loads(done.read_text())
            logger.info("%s reused from %s", name, done)
            times[name] = saved.get("seconds")
            if saved.get("load") is not None:
                loads.append(saved["load"])
            return SimpleNamespace(outputs={k: Path(v) for k, v in saved["outputs"].items()}, summary=saved["summary"])
        ctx = StageContext(workdir=args.workdir / name, inputs={"base_model": base, **inputs}, data=data,
                           seed=0, cache_dir=cache)
        began = time.perf_counter()
        result = get_stage(kind)(spec, ctx)
        times[name] = round(time.perf_counter() - began, 1)
        loads.append(os.getloadavg()[0])
        logger.info("%s done in %.1f s (load %.1f)", name, times[name], loads[-1])
        done.write_text(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                                    "summary": result.summary, "seconds": times[name], "load": loads[-1]},
                                   default=str))
        return result

    wiki_data = DataSpec(calibration="builtin:enwiki", evaluation="builtin:enwiki")
    base = resolve_model("builtin:smollm2-135m", cache)
    calibration = stage("calibrate", CalibrateStage(samples=args.calib_samples, seq_len=256), "calibrate",
                        wiki_data, model=base).outputs["calibration"]
    pruned = stage("prune", prune_stage(method="sparsegpt", pattern="2:4", export="none"), "prune", wiki_data,
                   model=base, calibration=calibration).outputs["model"]

    evaluate = EvaluateStage(seq_len=args.eval_seq_len, max_windows=args.eval_windows, compare_dense=True)
    reference: dict[str, dict[str, float]] = {}
    for text in EVAL_TEXTS:
        summary = stage("evaluate", evaluate, f"evaluate_pruned_{text[8:]}",
                        DataSpec(evaluation=text), model=pruned).summary
        reference[text] = {"dense": summary["dense_perplexity"], "pruned": summary["perplexity"]}

    runs = ([(setup, int(steps)) for setup, steps in (run.split(":") for run in args.runs)] if args.runs
            else [(setup, steps) for setup in args.setups for steps in args.steps])
    training = {"wiki": "builtin:enwiki"}
    if any(setup == "mix" for setup, _ in runs):
        training["mix"] = str(write_mix(args.workdir / "mix-text", cache))
    rows = []
    for setup, steps in runs:
        name = f"finetune_{setup}_{steps}"
        spec = FinetuneStage(steps=steps, lr=args.lr, warmup_steps=max(1, steps // 12),
                             batch_size=args.batch_size, seq_len=args.seq_len)
        tuned = stage("finetune", spec, name, DataSpec(calibration=training[setup]), model=pruned)
        changed, masked = changed_pruned_weights(pruned, tuned.outputs["model"])
        if changed:
            raise SystemExit(f"{name}: {changed} pruned weights changed during fine-tuning")
        row = {"setup": setup, "steps": steps, "train_tokens": steps * args.batch_size * args.seq_len,
               "finetune_s": times[name], "pruned_weights_changed": changed}
        for text in EVAL_TEXTS:
            ppl = stage("evaluate", evaluate.model_copy(update={"compare_dense": False}),
                        f"evaluate_{setup}_{steps}_{text[8:]}", DataSpec(evaluation=text),
                        model=tuned.outputs["model"]).summary["perplexity"]
            ref = reference[text]
            row[text] = {"perplexity": ppl,
                         "gap_recovered": (ref["pruned"] - ppl) / (ref["pruned"] - ref["dense"])}
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "benchmark": "finetune_transfer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "load_avg_1min_after_each_stage": {"min": min(loads), "max": max(loads)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": "builtin:smollm2-135m",
        "pruning": f"sparsegpt 2:4 via pipelines.stages.prune ({args.calib_samples} x 256 Wikipedia tokens)",
        "training": {"wiki": "builtin:enwiki calibration part",
                     "mix": "builtin:news calibration part + as many characters of builtin:enwiki calibration"},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "reference": reference,
        "runs": rows,
        "times_s": times,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for text in EVAL_TEXTS:
        ref = reference[text]
        print(f"\n{text}: dense {ref['dense']:.2f}, pruned 2:4 {ref['pruned']:.2f}")
        for row in rows:
            print(f"  {row['setup']:5s} {row['steps']:4d} steps: ppl {row[text]['perplexity']:.2f}, "
                  f"gap recovered {row[text]['gap_recovered']:.1%} ({row['finetune_s']:.0f} s fine-tuning)")
    return result


if __name__ == "__main__":
    main()
