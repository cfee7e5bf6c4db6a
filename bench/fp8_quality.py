"""Held-out perplexity of SmolLM2-135M in FP8 (emulated on the CPU): dense, dense FP8, SparseGPT 2:4, 2:4 + FP8.

Every row runs the real stages: `prune` (SparseGPT 2:4, its recipe defaults) and `quantize`
(`fp8_dynamic`; `_static` rows with `activations: static`, input scales from the same calibration tokens;
`_gptq` rows with `weight_rounding: gptq` on them),
and is scored by the `evaluate` stage on the held-out split of builtin:enwiki (the same windows for
every row; an FP8 model runs through `pipelines.quantize.emulate`, i.e. what an FP8 GEMM with fp32
accumulation computes). The built-in model is fp32, so the 2:4 baseline is fp32 (its source dtype).

Goals (issue 15): dense FP8 within 1% of dense; SparseGPT 2:4 + FP8 within 3% of SparseGPT 2:4.
Results go to `bench/results/fp8_quality.json` after every row (device, versions, command, load);
rows already there are reused unless `--fresh`, models are kept under `--work`.

    nice -n 10 .venv/bin/python bench/fp8_quality.py --samples 32 --seq-len 512
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.fp8_quality")
RESULTS = ROOT / "bench" / "results" / "fp8_quality.json"
# key, source row (None: the built-in model), stage that makes it from the source
ROWS = [
    ("dense", None, None),
    ("dense_fp8", "dense", "quantize"),
    ("sparsegpt_24", "dense", "prune"),
    ("sparsegpt_24_fp8", "sparsegpt_24", "quantize"),
    ("sparsegpt_24_fp8_static", "sparsegpt_24", "quantize_static"),
    ("dense_fp8_gptq", "dense", "quantize_gptq"),
    ("sparsegpt_24_fp8_gptq", "sparsegpt_24", "quantize_gptq"),
    # where dense FP8's loss comes from: its FP8 weights with unquantized inputs, and the dense weights
    # with inputs quantized per token (the same windows, `pipelines.data.perplexity`)
    ("dense_fp8_weights_only", "dense_fp8", "weights_only"),
    ("dense_fp8_inputs_only", "dense_fp8", "inputs_only"),
    ("sparsegpt_24_fp8_weights_only", "sparsegpt_24_fp8", "weights_only"),
    ("sparsegpt_24_fp8_inputs_only", "sparsegpt_24_fp8", "inputs_only"),
]
UNQUANTIZED = {"dense_fp8": "dense", "sparsegpt_24_fp8": "sparsegpt_24"}  # a diagnostic's inputs-only base
DIAGNOSTICS = ("weights_only", "inputs_only")
GOALS = {"dense_fp8": ("dense", 1.01), "sparsegpt_24_fp8": ("sparsegpt_24", 1.03),
         "dense_fp8_gptq": ("dense", 1.01), "sparsegpt_24_fp8_gptq": ("sparsegpt_24", 1.03)}


def _make(kind: str, source: Path, args, calibration: Path, work: Path) -> tuple[Path, dict]:
    """Run the stage that makes a row's model from its source; (model folder, stage summary)."""
    import torch

    from pipelines.recipe import DataSpec, QuantizeStage, prune_stage
    from pipelines.stage import StageContext
    from pipelines.stages import prune, quantize

    ctx = StageContext(workdir=work, inputs={"model": source, "calibration": calibration}, data=DataSpec(),
                       seed=args.seed, device=torch.device(args.device))
    if kind == "prune":
        spec = prune_stage(method="sparsegpt", pattern="2:4", batch_size=args.batch_size, export="none")
        result = prune.run(spec, ctx)
    else:
        activations = "static" if kind == "quantize_static" else "dynamic"
        rounding = "gptq" if kind == "quantize_gptq" else "nearest"
        result = quantize.run(QuantizeStage(activations=activations, weight_rounding=rounding,
                                            batch_size=args.batch_size, export="none"), ctx)
    return result.outputs["model"], result.summary


def _evaluate(model_dir: Path, args, work: Path) -> dict:
    import torch

    from pipelines.recipe import DataSpec, EvaluateStage
    from pipelines.stage import StageContext
    from pipelines.stages import evaluate

    spec = EvaluateStage(seq_len=args.eval_seq_len, max_windows=args.eval_windows, batch_size=2,
                         compare_dense=False)
    ctx = StageContext(workdir=work / "eval", inputs={"model": model_dir}, data=DataSpec(), seed=args.seed,
                       device=torch.device(args.device), cache_dir=args.cache)
    report = json.loads(evaluate.run(spec, ctx).outputs["report"].read_text())
    return {"perplexity": report["perplexity"], "sparsity": report["sparsity"]["total"]["sparsity"],
            "quantization": report["quantization"], "eval": report["eval"]}


def _diagnose(kind: str, fp8_dir: Path, base_dir: Path, args) -> dict:
    """Perplexity of half of FP8: its weights alone (plain model), or its per-token inputs alone (on the
    unquantized model `base_dir`)."""
    import torch

    from pipelines.data import eval_windows, perplexity
    from pipelines.modelio import load_model, load_tokenizer
    from pipelines.quantize import Fp8Layer, read_fp8_layers
    from pipelines.quantize.emulate import attach_emulation
    from pipelines.sources import load_text
    from pipelines.stages.evaluate import sparsity_report

    windows = eval_windows(load_tokenizer(base_dir), load_text("builtin:enwiki", "evaluation", args.cache),
                           args.eval_seq_len, args.eval_windows)
    model = load_model(fp8_dir if kind == "weights_only" else base_dir, device=args.device)
    sparsity = sparsity_report(model)["total"]["sparsity"]
    if kind == "inputs_only":  # scale 1 and the fp32 weight as its own "codes": only the inputs become E4M3
        attach_emulation(model, {name: Fp8Layer(torch.ones_like(layer.weight_scale), None, "dynamic")
                                 for name, layer in read_fp8_layers(fp8_dir).items()})
        for module in model.modules():
            if hasattr(module, "weight_codes"):
                module.weight_codes = module.weight.detach().float().clone()
    return {"perplexity": perplexity(model, windows, 2), "sparsity": sparsity, "quantization": kind,
            "eval": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}}


def _goals(rows: dict) -> dict:
    out = {}
    for key, (base, limit) in GOALS.items():
        if key in rows and base in rows:
            ratio = rows[key]["perplexity"] / rows[base]["perplexity"]
            out[f"{key}_vs_{base}"] = {"ratio": ratio, "goal": f"<= {limit}", "met": ratio <= limit}
    if "sparsegpt_24_fp8_static" in rows and "sparsegpt_24" in rows:
        ratio = rows["sparsegpt_24_fp8_static"]["perplexity"] / rows["sparsegpt_24"]["perplexity"]
        out["sparsegpt_24_fp8_static_vs_sparsegpt_24"] = {"ratio": ratio, "goal": "none (static input scales)"}
    return out


def _table(rows: dict) -> list[str]:
    dense = rows.get("dense", {}).get("perplexity")
    lines = [f"{'row':<26} {'sparsity':>8} {'ppl':>9} {'vs dense':>9} {'make s':>8} {'eval s':>8}"]
    for key, row in rows.items():
        ratio = f"{row['perplexity'] / dense:.4f}" if dense else "-"
        lines.append(f"{key:<26} {row['sparsity']:>8.4f} {row['perplexity']:>9.3f} {ratio:>9} "
                     f"{row.get('make_s') or 0:>8.1f} {row['eval_s']:>8.1f}")
    return lines


def _write(rows: dict, args, torch, transformers) -> None:
    import compressed_tensors

    args.results.parent.mkdir(parents=True, exist_ok=True)
    loads = [row["load_after"] for row in rows.values() if row.get("load_after") is not None]
    args.results.write_text(json.dumps({
        "benchmark": "fp8_quality",
        "device": (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads)" if args.device == "cpu"
                   else f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})")
                  + ", FP8 emulated (pipelines.quantize.emulate)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_avg_1min_after_each_row": {"min": min(loads), "max": max(loads)} if loads else None,
        "model": "builtin:smollm2-135m (SmolLM2-135M-Instruct, GGUF dequantized to fp32)",
        "calibration": {"source": "builtin:enwiki calibration split", "samples": args.samples,
                        "seq_len": args.seq_len, "seed": args.seed},
        "evaluation": {"source": "builtin:enwiki evaluation split", "windows": args.eval_windows,
                       "seq_len": args.eval_seq_len},
        "settings": {"prune": "sparsegpt 2:4, recipe defaults (block 128, dampening 0.01, act_order and "
                              "within_layer on), fp32", "quantize": "fp8_dynamic: E4M3 weights per output "
                              "channel, inputs per token (static row: per tensor from calibration); weights "
                              "rounded to nearest (gptq rows: GPTQ on the calibration tokens, block 128, "
                              "dampening 0.01, act_order on); every decoder Linear, lm_head and embeddings not "
                              "quantized"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed_tensors": compressed_tensors.__version__, "python": platform.python_version()},
        "rows": rows,
        "goals": _goals(rows),
        "table": _table(rows),
    }, indent=2))


def prepare(args) -> tuple[Path, Path]:
    """(the built-in model's folder, the calibration tokens' file), made once under `args.work`; sets
    `args.cache`."""
    from safetensors.torch import save_file

    from orchestrator.settings import get_settings
    from pipelines.data import calibration_samples
    from pipelines.modelio import load_tokenizer
    from pipelines.sources import load_text, resolve_model

    args.cache = get_settings().cache_dir
    model_dir = resolve_model("builtin:smollm2-135m", args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = args.work / f"calibration_{args.samples}x{args.seq_len}_seed{args.seed}.safetensors"
    if not calibration.exists():
        ids = calibration_samples(load_tokenizer(model_dir), load_text("builtin:enwiki", "calibration", args.cache),
                                  args.samples, args.seq_len, args.seed)
        save_file({"input_ids": ids}, str(calibration), metadata={
            "num_tokens": str(ids.numel()), "seq_len": str(args.seq_len), "samples": str(args.samples)})
    return model_dir, calibration


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Calibration, evaluation and where the models are made: what `prepare`, `_make` and the scoring read."""
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the stages run (cuda: the same emulation, faster)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-fp8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--only", nargs="*", default=None, help="row keys to (re)run")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch
    import transformers

    model_dir, calibration = prepare(args)
    previous = json.loads(args.results.read_text()) if args.results.exists() and not args.fresh else {}
    rows: dict = dict(previous.get("rows", {}))
    models: dict[str, Path] = {"dense": model_dir}
    for key, source, kind in ROWS:
        work = args.work / key
        if kind in DIAGNOSTICS:
            models[key] = models[source]
        elif kind is not None:
            models[key] = work / "model"
        if key in rows and (args.only is None or key not in args.only) and models[key].is_dir():
            continue
        if args.only is not None and key not in args.only and key in rows:
            continue
        logger.info("row %s", key)
        start, summary = time.perf_counter(), None
        if kind is not None and kind not in DIAGNOSTICS:
            models[key], summary = _make(kind, models[source], args, calibration, work)
        make_s = time.perf_counter() - start if kind is not None else None
        start = time.perf_counter()
        if kind in DIAGNOSTICS:
            row = _diagnose(kind, models[source], models[UNQUANTIZED[source]], args)
        else:
            row = _evaluate(models[key], args, work)
        row.update(eval_s=time.perf_counter() - start, make_s=make_s, made_by=kind, source=source,
                   stage_summary=summary, load_after=os.getloadavg()[0])
        rows[key] = row
        logger.info("%s: ppl %.3f (%.0f s + %.0f s)", key, row["perplexity"], make_s or 0, row["eval_s"])
        _write(rows, args, torch, transformers)
    _write(rows, args, torch, transformers)
    print("\n".join(_table(rows)))
    print(json.dumps(_goals(rows), indent=2))


if __name__ == "__main__":
    main()
