"""Prune-stage wall time on the CPU: sparseflow vs llm-compressor's `oneshot`, same model, same tokens.

The model is `builtin:smollm2-135m` (fp32), the calibration set `--samples` x `--seq-len` token ids
drawn from the `builtin:enwiki` calibration text (written once to a file; both tools read the same
ids). Every run is a fresh process with torch's default thread count (recorded), timed around the
pruning call only: sparseflow's prune stage `run(spec, ctx)` (model load, layer-by-layer pruning,
writing the model; `export: none`) and llm-compressor's `oneshot(...)` (its model preparation,
calibration and pruning; the model is loaded before the clock starts). Each method/pattern runs
both tools back to back, so they share the machine's load; `uptime`'s load average is recorded
before and after every run. After timing, each pruned model's decoder sparsity is checked and its
held-out perplexity measured (same windows for all rows), so speed is never bought with quality.

llm-compressor runs in its own virtual environment, `--llmc-python /tmp/llmc-venv/bin/python`
(created with `python3 -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0
llmcompressor==0.14.0.1`).

    python bench/pruning_cpu.py --llmc-python /tmp/llmc-venv/bin/python          # 64 x 512, all rows
    python bench/pruning_cpu.py --tiny --llmc-python /tmp/llmc-venv/bin/python   # logic check, 4 x 64

Results: `bench/results/pruning_cpu.json` (rows appended as they finish; `--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pruning_cpu.json"
PAIRS = [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4"),
         ("magnitude", "unstructured"), ("magnitude", "2:4")]

# Runs inside the llm-compressor venv: imports nothing from sparseflow.
LLMC_WORKER = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

args = json.loads(sys.argv[1])
torch.manual_seed(0)
ids = load_file(args["calibration"])["input_ids"]
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
structure = "0:0" if args["pattern"] == "unstructured" else args["pattern"]
common = dict(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
if args["method"] == "sparsegpt":
    recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
else:
    recipe = WandaPruningModifier(**common)
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
        batch_size=args["batch_size"])
seconds = time.perf_counter() - start
model.save_pretrained(args["out"], save_compressed=False)
import llmcompressor, transformers
print("RESULT " + json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "versions": {
    "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
    "torch": torch.__version__}}), flush=True)
"""


def worker_ours(args: argparse.Namespace) -> dict:
    """One prune stage in this process; prints nothing but the RESULT line's dict (returned)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pipelines.recipe import DataSpec, prune_stage
    from pipelines.stage import StageContext
    from pipelines.stages.prune import run

    fields = {"method": args.method, "pattern": args.pattern, "export": "none", "batch_size": args.batch_size}
    if args.pattern == "unstructured":
        fields["sparsity"] = 0.5
    spec = prune_stage(**fields)
    inputs = {"model": Path(args.model), "calibration": Path(args.calibration)}
    ctx = StageContext(workdir=Path(args.out), inputs=inputs, data=DataSpec(), seed=0, device=torch.device("cpu"))
    start = time.perf_counter()
    result = run(spec, ctx)
    seconds = time.perf_counter() - start
    metrics = {m.name: m.value for m in result.metrics}
    return {"seconds": seconds, "prune_time_s": metrics["prune_time_s"], "threads": torch.get_num_threads(),
            "within_layer": getattr(spec, "calibrate_within_layer", None)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run(cmd: list[str], env: dict | None, timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def _evaluate(model_dir: Path, windows) -> dict:
    """Decoder sparsity, 2:4 validity and held-out perplexity of a pruned model directory."""
    import torch

    from pipelines.data import perplexity
    from pipelines.modeling import decoder_layers, find_linears
    from pipelines.modelio import load_model
    from pipelines.pruning.patterns import is_nm_sparse

    model = load_model(model_dir)
    prefix, layers = decoder_layers(model)
    linears = find_linears(layers, ["re:.*"], prefix=prefix)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    with torch.no_grad():
        valid = all(is_nm_sparse(m.weight, (2, 4)) for m in linears.values())
    return {"sparsity": zeros / total, "valid_2_4": valid, "perplexity": perplexity(model, windows, 4)}


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, object]:
    from safetensors.torch import save_file

    from orchestrator.settings import get_settings
    from pipelines.data import calibration_samples, eval_windows
    from pipelines.modelio import load_tokenizer
    from pipelines.sources import load_text, resolve_model

    cache = get_settings().cache_dir
    model_dir = resolve_model("builtin:smollm2-135m", cache)
    tokenizer = load_tokenizer(model_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = args.work / f"calibration_{args.samples}x{args.seq_len}.safetensors"
    text = load_text("builtin:enwiki", "calibration", cache)
    save_file({"input_ids": calibration_samples(tokenizer, text, args.samples, args.seq_len, 0)}, str(calibration))
    windows = eval_windows(tokenizer, load_text("builtin:enwiki", "evaluation", cache), args.eval_seq_len,
                           args.eval_windows)
    return model_dir, calibration, windows


def _table(rows: list[dict]) -> list[str]:
    lines = [f"{'method':<10} {'pattern':<13} {'tool':<15} {'seconds':>8} {'load before/after':>18} {'ppl':>8}"]
    for r in rows:
        load = f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}" if "load_after" in r else "-"
        lines.append(f"{r['method']:<10} {r['pattern']:<13} {r['tool']:<15} {r.get('seconds', float('nan')):>8.1f} "
                     f"{load:>18} {r.get('perplexity', float('nan')):>8.2f}  {r.get('status', '')}")
    for method, pattern in PAIRS:
        ours = [r for r in rows if (r["method"], r["pattern"], r["tool"]) == (method, pattern, "sparseflow")
                and "seconds" in r]
        theirs = [r for r in rows if (r["method"], r["pattern"], r["tool"]) == (method, pattern, "llm-compressor")
                  and "seconds" in r]
        if ours and theirs:
            a, b = min(r["seconds"] for r in ours), min(r["seconds"] for r in theirs)
            lines.append(f"{method} {pattern}: sparseflow {a:.1f} s vs llm-compressor {b:.1f} s ({b / a:.2f}x; best "
                         f"of {len(ours)} / {len(theirs)})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method")
    parser.add_argument("--pattern")
    parser.add_argument("--model")
    parser.add_argument("--calibration")
    parser.add_argument("--out")
    parser.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="sparseflow: the recipe's default")
    parser.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor: oneshot's default")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="4 x 64 tokens, 2 windows: checks the logic")
    parser.add_argument("--only", nargs="*", default=None, help="e.g. sparsegpt/2:4 wanda/unstructured")
    parser.add_argument("--tools", default="sparseflow,llm-compressor")
    parser.add_argument("--no-quality", action="store_true", help="skip the perplexity of each pruned model")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-cpu"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="drop the rows already in the results file")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker_ours(args)), flush=True)
        return
    if args.tiny:
        args.samples, args.seq_len, args.eval_windows, args.eval_seq_len = 4, 64, 2, 128

    sys.path.insert(0, str(ROOT))
    import torch

    model_dir, calibration, windows = _prepare(args)
    previous = json.loads(args.results.read_text()) if args.results.exists() and not args.fresh else {}
    rows: list[dict] = previous.get("rows", [])
    versions = previous.get("versions", {})
    tools = args.tools.split(",")
    for method, pattern in PAIRS:
        if args.only is not None and f"{method}/{pattern}" not in args.only:
            continue
        for tool in tools:
            if tool == "llm-compressor" and method == "magnitude":
                continue  # llm-compressor 0.14 has no one-shot magnitude modifier to compare with
            out = args.work / f"{tool}_{method}_{pattern.replace(':', '')}"
            row = {"method": method, "pattern": pattern, "tool": tool, "samples": args.samples,
                   "seq_len": args.seq_len, "load_before": _load(), "started": time.strftime("%H:%M:%S")}
            common = ["--method", method, "--pattern", pattern, "--model", str(model_dir), "--calibration",
                      str(calibration), "--out", str(out)]
            try:
                if tool == "sparseflow":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch-size",
                           str(args.batch_size), *common]
                    row.update(_run(cmd, None, args.timeout), batch_size=args.batch_size)
                    model_out = out / "model"
                else:
                    payload = {"model": str(model_dir), "calibration": str(calibration), "out": str(out / "model"),
                               "method": method, "pattern": pattern, "batch_size": args.llmc_batch_size}
                    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                    result = _run([args.llmc_python, "-c", LLMC_WORKER, json.dumps(payload)], env, args.timeout)
                    versions["llm-compressor-venv"] = result.pop("versions")
                    row.update(result, batch_size=args.llmc_batch_size)
                    model_out = out / "model"
                row["load_after"] = _load()
                if not args.no_quality:
                    row.update(_evaluate(model_out, windows))
                row["status"] = "ok"
            except subprocess.TimeoutExpired:
                row.update(status=f"timeout: still running after {args.timeout:.0f} s", load_after=_load())
            except RuntimeError as error:
                row.update(status=f"failed: {str(error)[-500:]}", load_after=_load())
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args, rows, versions, torch, windows)
    print("\n".join(_table(rows)))


def _write(args: argparse.Namespace, rows: list[dict], versions: dict, torch, windows) -> None:
    import transformers

    versions["sparseflow"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "benchmark": "pruning_cpu",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), shared machine: "
                  "see each row's load average (1, 5, 15 min) before and after",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "builtin:smollm2-135m (SmolLM2-135M-Instruct, fp32)",
        "calibration": {"source": "builtin:enwiki calibration split", "samples": args.samples,
                        "seq_len": args.seq_len, "seed": 0},
        "evaluation": {"source": "builtin:enwiki evaluation split", "windows": int(windows.shape[0]),
                       "seq_len": int(windows.shape[1])},
        "settings": {"sparsity": 0.5, "sparseflow": "prune stage defaults per method, export none, fp32",
                     "llm-compressor": "oneshot, sequential pipeline, block_size 128, dampening 0.01, fp32",
                     "timed": "sparseflow: the whole prune stage run() (load, prune, save); "
                              "llm-compressor: the oneshot() call (model loaded before)"},
        "versions": versions,
        "rows": rows,
        "table": _table(rows),
    }, indent=2))


if __name__ == "__main__":
    main()
