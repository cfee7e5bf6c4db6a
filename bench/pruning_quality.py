"""Held-out perplexity of SmolLM2-135M pruned by sparseflow vs llm-compressor's `oneshot`, on the CPU.

Rows: dense; SparseGPT and Wanda at 50% unstructured and 2:4 by both tools; magnitude (ours) as a
floor. Both tools get the same calibration token ids (written once to a file), the same targets
(every Linear of the decoder layers; lm_head and embeddings dense), fp32, and the same seed; every
pruned model is scored by the same perplexity code on the same held-out windows, and its sparsity
is checked before it is scored.

llm-compressor runs in its own virtual environment (it pins other versions of compressed-tensors
and transformers), as a subprocess of this script: `--llmc-python /tmp/llmc-venv/bin/python`.
Results are written after every row to `bench/results/pruning_quality.json`, and rows already
there are reused unless `--fresh`, so an interrupted run resumes.

    python bench/pruning_quality.py --llmc-python /tmp/llmc-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench.pruning_quality")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pruning_quality.json"
ROWS = [
    ("dense", None, None),
    ("sparseflow", "sparsegpt", "unstructured"),
    ("llm-compressor", "sparsegpt", "unstructured"),
    ("sparseflow", "sparsegpt", "2:4"),
    ("llm-compressor", "sparsegpt", "2:4"),
    ("sparseflow", "wanda", "unstructured"),
    ("llm-compressor", "wanda", "unstructured"),
    ("sparseflow", "wanda", "2:4"),
    ("llm-compressor", "wanda", "2:4"),
    ("sparseflow", "magnitude", "unstructured"),
    ("sparseflow", "magnitude", "2:4"),
]

# Runs inside the llm-compressor venv: imports nothing from sparseflow.
LLMC_WORKER = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

args = json.loads(sys.argv[1])
torch.manual_seed(args["seed"])
ids = load_file(args["calibration"])["input_ids"]
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
structure = "0:0" if args["pattern"] == "unstructured" else args["pattern"]
common = dict(sparsity=args["sparsity"], mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
if args["method"] == "sparsegpt":
    recipe = SparseGPTModifier(block_size=args["block_size"], dampening_frac=args["dampening"], **common)
else:
    recipe = WandaPruningModifier(**common)
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential", batch_size=1)
seconds = time.perf_counter() - start
model.save_pretrained(args["out"], save_compressed=False)
import llmcompressor, compressed_tensors, transformers
print("LLMC_RESULT " + json.dumps({"prune_s": seconds, "versions": {
    "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
    "transformers": transformers.__version__, "torch": torch.__version__}}))
"""


def _row_key(tool: str, method: str | None, pattern: str | None) -> str:
    return tool if method is None else f"{tool}/{method}/{pattern}"


def _linear_sparsity(model) -> tuple[float, bool]:
    """Fraction of zeros over decoder Linears, and whether every one is 2:4 valid."""
    import torch

    from pipelines.modeling import decoder_layers, find_linears
    from pipelines.pruning.patterns import is_nm_sparse

    prefix, layers = decoder_layers(model)
    linears = find_linears(layers, ["re:.*"], prefix=prefix)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    with torch.no_grad():
        valid_24 = all(is_nm_sparse(m.weight, (2, 4)) for m in linears.values())
    return zeros / total, valid_24


def _evaluate(model_dir: Path, windows, batch_size: int) -> dict:
    from pipelines.data import perplexity
    from pipelines.modelio import load_model

    model = load_model(model_dir)
    sparsity, valid_24 = _linear_sparsity(model)
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size)
    return {"perplexity": ppl, "sparsity": sparsity, "valid_2_4": valid_24, "eval_s": time.perf_counter() - start}


def _run_ours(method: str, pattern: str, args, model_dir: Path, calibration: Path, work: Path) -> tuple[Path, float]:
    import torch

    from pipelines.recipe import DataSpec, prune_stage
    from pipelines.stage import StageContext
    from pipelines.stages.prune import run

    settings: dict = {"pattern": pattern, "batch_size": args.batch_size, "export": "none"}
    if pattern == "unstructured":
        settings["sparsity"] = 0.5  # an N:M pattern fixes the sparsity itself
    if method != "magnitude":
        settings["within_layer"] = args.within_layer
    if method == "sparsegpt":
        settings.update(block_size=args.block_size, dampening=args.dampening, act_order=args.act_order)
    spec = prune_stage(method=method, **settings)
    inputs = {"model": model_dir} if method == "magnitude" else {"model": model_dir, "calibration": calibration}
    ctx = StageContext(workdir=work, inputs=inputs, data=DataSpec(),
                       seed=args.seed, device=torch.device("cpu"))
    start = time.perf_counter()
    run(spec, ctx)
    return work / "model", time.perf_counter() - start


def _run_llmc(
    method: str, pattern: str, args, model_dir: Path, calibration: Path, work: Path
) -> tuple[Path, float, dict]:
    payload = {"model": str(model_dir), "calibration": str(calibration), "out": str(work / "model"),
               "method": method, "pattern": pattern, "sparsity": 0.5, "block_size": args.block_size,
               "dampening": args.dampening, "seed": args.seed}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([args.llmc_python, "-c", LLMC_WORKER, json.dumps(payload)], capture_output=True,
                          text=True, env=env, cwd=work, check=False)
    (work / "llmc.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        log = work / "llmc.log"
        raise RuntimeError(f"llm-compressor failed ({proc.returncode}); see {log}:\n{proc.stderr[-2000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LLMC_RESULT "))
    result = json.loads(line.removeprefix("LLMC_RESULT "))
    return work / "model", result["prune_s"], result["versions"]


def _table(rows: list[dict]) -> str:
    dense = next((r["perplexity"] for r in rows if r["tool"] == "dense"), None)
    lines = [f"{'tool':<15} {'method':<10} {'pattern':<13} {'sparsity':>8} {'ppl':>9} {'vs dense':>9} {'prune s':>8}"]
    for r in rows:
        ratio = f"{r['perplexity'] / dense:.2f}x" if dense else "-"
        lines.append(
            f"{r['tool']:<15} {r.get('method') or '-':<10} {r.get('pattern') or '-':<13} {r['sparsity']:>8.4f} "
            f"{r['perplexity']:>9.2f} {ratio:>9} {r.get('prune_s') or 0:>8.1f}"
        )
    gaps = []
    for method in ("sparsegpt", "wanda"):
        for pattern in ("unstructured", "2:4"):
            ours = next((r for r in rows if r["key"] == f"sparseflow/{method}/{pattern}"), None)
            theirs = next((r for r in rows if r["key"] == f"llm-compressor/{method}/{pattern}"), None)
            if ours and theirs:
                delta = ours["perplexity"] - theirs["perplexity"]
                verdict = "ours <= theirs" if delta <= 0 else "ours WORSE"
                gaps.append(f"{method} {pattern}: ours {ours['perplexity']:.2f} vs llm-compressor "
                            f"{theirs['perplexity']:.2f} ({delta:+.2f}, {100 * delta / theirs['perplexity']:+.1f}%) "
                            f"-> {verdict}")
    return "\n".join(lines + [""] + gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--within-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="sparseflow: re-calibrate o_proj/down_proj after q/k/v and gate/up are pruned "
                             "(default: the recipe's, on for sparsegpt and for wanda unstructured)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                        help="sparseflow SparseGPT: columns by decreasing Hessian diagonal (default: the recipe's, "
                             "on for N:M only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-quality"))
    parser.add_argument("--only", nargs="*", default=None, help="row keys to run, e.g. sparseflow/wanda/2:4")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results JSON (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    import transformers

    from orchestrator.settings import get_settings
    from pipelines.data import calibration_samples, eval_windows
    from pipelines.modelio import load_tokenizer
    from pipelines.sources import load_text, resolve_model

    cache = get_settings().cache_dir
    model_dir = resolve_model("builtin:smollm2-135m", cache)
    tokenizer = load_tokenizer(model_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = args.work / "calibration.safetensors"
    ids = calibration_samples(tokenizer, load_text("builtin:enwiki", "calibration", cache), args.samples,
                              args.seq_len, args.seed)
    from safetensors.torch import save_file

    save_file({"input_ids": ids}, str(calibration))
    windows = eval_windows(tokenizer, load_text("builtin:enwiki", "evaluation", cache), args.eval_seq_len,
                           args.eval_windows)

    previous = json.loads(args.results.read_text()) if args.results.exists() and not args.fresh else {}
    done = {r["key"]: r for r in previous.get("rows", [])}
    llmc_versions = previous.get("versions", {}).get("llm-compressor-venv", {})
    rows = []
    for tool, method, pattern in ROWS:
        key = _row_key(tool, method, pattern)
        if key in done and (args.only is None or key not in args.only):
            rows.append(done[key])
            continue
        if args.only is not None and key not in args.only:
            continue
        logger.info("running %s", key)
        work = args.work / key.replace("/", "_").replace(":", "")
        work.mkdir(parents=True, exist_ok=True)
        prune_s = None
        if tool == "dense":
            out = model_dir
        elif tool == "sparseflow":
            out, prune_s = _run_ours(method, pattern, args, model_dir, calibration, work)
        else:
            out, prune_s, llmc_versions = _run_llmc(method, pattern, args, model_dir, calibration, work)
        row = {"key": key, "tool": tool, "method": method, "pattern": pattern, "prune_s": prune_s,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), **_evaluate(out, windows, 4)}
        logger.info("%s: %s", key, row)
        rows.append(row)
        _write(rows, args, windows, llmc_versions, torch, transformers)
    _write(rows, args, windows, llmc_versions, torch, transformers)
    print(_table(rows))


def _write(rows, args, windows, llmc_versions, torch, transformers) -> None:
    import compressed_tensors

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "benchmark": "pruning_quality",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "builtin:smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
        "calibration": {"source": "builtin:enwiki calibration split", "samples": args.samples,
                        "seq_len": args.seq_len, "seed": args.seed},
        "evaluation": {"source": "builtin:enwiki evaluation split", "windows": int(windows.shape[0]),
                       "seq_len": int(windows.shape[1])},
        "settings": {"sparsity": 0.5, "within_layer_ours": args.within_layer, "act_order_ours": args.act_order,
                     "block_size": args.block_size,
                     "dampening": args.dampening,
                     "targets": "every Linear of the decoder layers; lm_head and embeddings dense", "dtype": "float32",
                     "batch_size_ours": args.batch_size, "batch_size_llmc": 1},
        "versions": {"sparseflow": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "compressed_tensors": compressed_tensors.__version__,
                                    "python": platform.python_version()},
                     "llm-compressor-venv": llmc_versions},
        "rows": rows,
        "table": _table(rows).splitlines(),
    }, indent=2))


if __name__ == "__main__":
    main()
