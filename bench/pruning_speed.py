"""Wall time and peak GPU memory of SparseGPT: sparseflow vs llm-compressor, same GPU, same run.

The model is a Llama-shaped stack with the dimensions of Llama-3-8B (hidden 4096, MLP 14336, 32
heads, 8 KV heads; 4 decoder layers, vocab 32000, tied embeddings, random bf16 weights) and the
calibration set is 128 x 2048 random token ids. Each (tool, pattern) runs in a fresh process that
loads the model to the CPU, warms the GPU up, then times only the pruning call (sparseflow's
`run_sequential` + `prune_layer`, llm-compressor's `oneshot`) and reads
`torch.cuda.max_memory_allocated`. After timing, each worker checks its result: the sparsity of
the pruned Linears and, for 2:4, that every group is valid.

    python bench/pruning_speed.py --out-dir $OUT            # on the GPU machine
    python bench/pruning_speed.py --tiny --device cpu \\
        --llmc-python /tmp/llmc-venv/bin/python            # logic check here, tiny sizes

Results go to `<out-dir>/pruning_speed.json` (and the table to stdout), one row per run, written
after every run so a run cut short still reports what finished.
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
LLAMA3_8B = {"hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "layers": 4, "vocab": 32000,
             "samples": 128, "seq_len": 2048}
TINY = {"hidden": 64, "mlp": 128, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 512, "samples": 8, "seq_len": 64}
TARGETS = r"re:.*\.(self_attn|mlp)\.\w+_proj$"


def build(work: Path, dims: dict, device: str, seed: int) -> tuple[Path, Path]:
    """Random bf16 Llama model directory and calibration ids file."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["mlp"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=max(8192, dims["seq_len"]), rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).cpu().eval()
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    _save_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dims["vocab"], (dims["samples"], dims["seq_len"]), generator=generator)
    calibration = work / "calibration.safetensors"
    save_file({"input_ids": ids}, str(calibration))
    return model_dir, calibration


def _save_tokenizer(model_dir: Path) -> None:
    """A stand-in word-level tokenizer: llm-compressor wants a processor beside a dataset, even a tokenized one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(model_dir)


def _warm_up(device, solver: bool = False, nm: tuple[int, int] | None = None) -> None:
    """GPU clocks up, and for sparseflow its JIT-compiled solver kernels built (Triton caches them on disk, so
    a service pays the compile once per machine, not per job): a small SparseGPT solve of the same pattern."""
    import torch

    if device.type == "cuda":
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        if solver:
            from pipelines.pruning.sparsegpt import prune_sparsegpt

            w = torch.randn(256, 512, device=device)
            x = torch.randn(1024, 512, device=device)
            prune_sparsegpt(w, x.t() @ x, 0.5, nm)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _check(model, pattern: str) -> dict:
    """Sparsity of the decoder Linears and, for 2:4, whether every group of four is valid."""
    import torch

    zeros = total = 0
    valid = True
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight
            zeros += int((w == 0).sum())
            total += w.numel()
            if pattern == "2:4":
                valid &= bool((w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())
    return {"sparsity": zeros / total, "valid_2_4": valid if pattern == "2:4" else None}


def worker_ours(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from safetensors.torch import load_file

    from pipelines.modelio import load_model
    from pipelines.pruning.engine import MethodConfig, prune_layer
    from pipelines.pruning.patterns import pattern_sparsity
    from pipelines.pruning.sequential import run_sequential
    from pipelines.pruning.targets import resolve_targets
    from pipelines.recipe import SparseGPTPrune

    device = torch.device(args.device)
    model = load_model(args.model, "cpu", torch.bfloat16)
    ids = load_file(args.calibration)["input_ids"]
    spec = SparseGPTPrune(pattern=args.pattern, within_layer=args.within_layer)  # stage defaults
    nm = spec.nm
    config = MethodConfig("sparsegpt", nm, block_size=128, dampening=0.01, act_order=spec.use_act_order)
    sparsity = pattern_sparsity(0.5, nm)
    _warm_up(device, solver=True, nm=nm)
    start = time.perf_counter()
    targets = resolve_targets(model, [TARGETS], ["lm_head"])
    damping = []
    peak = run_sequential(
        model, ids, targets,
        lambda work: damping.extend(o.damping for o in prune_layer(work, config, sparsity)),
        device=device, batch_size=args.batch_size, within_layer=spec.calibrate_within_layer,
    )
    wall = time.perf_counter() - start
    from pipelines.pruning.sparsegpt import solve_path

    return {"wall_s": wall, "peak_gpu_mem_bytes": peak, "max_damping": max(damping), "gram": _gram_path(device),
            "solve_path": solve_path(device, nm, 128), **_check(model, args.pattern)}


def _gram_path(device) -> str:
    """Whether xᵀx of bf16 inputs ran as a bf16 GEMM with fp32 output (else upcast to fp32 first)."""
    import torch

    if device.type != "cuda":
        return "fp32"
    try:
        a = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32)
        return "bf16 GEMM, fp32 output"
    except (RuntimeError, TypeError):
        return "fp32 (upcast)"


def worker_llmc(args) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    ids = load_file(args.calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure=structure, block_size=128, dampening_frac=0.01,
                               targets=["Linear"], ignore=["re:.*lm_head"])
    _warm_up(device)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    model.to("cpu")
    return {"wall_s": wall, "peak_gpu_mem_bytes": peak, **_check(model, args.pattern)}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _table(rows: list[dict]) -> str:
    lines = [f"{'tool':<15} {'pattern':<13} {'wall s':>8} {'peak GPU GiB':>13} {'sparsity':>9} {'2:4 ok':>7}  status"]
    for r in rows:
        peak = r.get("peak_gpu_mem_bytes")
        lines.append(
            f"{r['tool']:<15} {r['pattern']:<13} {r.get('wall_s', float('nan')):>8.1f} "
            f"{(peak or 0) / 2**30:>13.2f} {r.get('sparsity', float('nan')):>9.4f} "
            f"{str(r.get('valid_2_4', '-')):>7}  {r.get('status', '')}"
        )
    for pattern in ("unstructured", "2:4"):
        ours = next((r for r in rows if r["tool"] == "sparseflow" and r["pattern"] == pattern and "wall_s" in r), None)
        theirs = next((r for r in rows if r["tool"] == "llm-compressor" and r["pattern"] == pattern and "wall_s" in r),
                      None)
        if ours and theirs:
            speedup = theirs["wall_s"] / ours["wall_s"]
            lines.append(f"{pattern}: sparseflow {ours['wall_s']:.1f} s vs llm-compressor {theirs['wall_s']:.1f} s "
                         f"({speedup:.2f}x); peak {ours['peak_gpu_mem_bytes'] / 2**30:.2f} vs "
                         f"{theirs['peak_gpu_mem_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["ours", "llmc"])
    parser.add_argument("--model")
    parser.add_argument("--calibration")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--within-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="ours: re-calibrate each shared-input group after the groups before it "
                             "(default: the prune stage's)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to check the logic")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-speed"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--llmc-python", default=sys.executable)
    parser.add_argument("--tools", default="sparseflow,llm-compressor",
                        help="comma list of sparseflow, sparseflow-one-pass (within_layer off), llm-compressor")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per worker")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds for all workers together")
    args = parser.parse_args()

    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_llmc)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    dims = TINY if args.tiny else LLAMA3_8B
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir, calibration = build(args.work, dims, args.device, seed=0)
    build_s = time.perf_counter() - start
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows: list[dict] = []
    report = {
        "benchmark": "pruning_speed", "device": device_name, "dims": dims, "build_s": build_s,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"method": "sparsegpt", "sparsity": 0.5, "block_size": 128, "dampening": 0.01,
                     "dtype": "bfloat16", "batch_size": args.batch_size,
                     "timed": "pruning call only (model already loaded on the CPU, GPU warmed up)"},
        "versions": _versions(), "rows": rows,
    }
    runs = [(tool, pattern) for tool in args.tools.split(",") for pattern in ("unstructured", "2:4")]
    for tool, pattern in runs:
        ours = tool.startswith("sparseflow")
        python, worker = (args.ours_python, "ours") if ours else (args.llmc_python, "llmc")
        cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--model", str(model_dir),
               "--calibration", str(calibration), "--pattern", pattern, "--device", args.device,
               "--batch-size", str(args.batch_size)]
        if tool == "sparseflow-one-pass":
            cmd.append("--no-within-layer")
        row = {"tool": tool, "pattern": pattern}
        began = time.perf_counter()
        timeout = min(args.timeout, args.deadline - (began - start))
        if timeout < 20:
            rows.append({**row, "status": "skipped: deadline"})
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode == 0 and line:
                row.update(json.loads(line.removeprefix("RESULT ")), status="ok")
            else:
                row.update(status=f"failed rc={proc.returncode}", error=proc.stderr[-1500:])
        except subprocess.TimeoutExpired:
            row.update(status=f"timeout after {timeout:.0f} s")
        row["process_s"] = time.perf_counter() - began
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if "error" in row:
            print(row["error"], flush=True)
        report["table"] = _table(rows).splitlines()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "pruning_speed.json").write_text(json.dumps(report, indent=2))
    print(f"device: {device_name}")
    print(_table(rows))


if __name__ == "__main__":
    main()
