"""SparseGPT on 1 GPU against 2 GPUs of one host: wall time, peak memory per GPU, mask agreement.

The model is a Llama-shaped stack with the dimensions of Llama-3-8B (hidden 4096, MLP 14336, 32
heads, 8 KV heads; 8 decoder layers, vocab 32000, tied embeddings, random bf16 weights) and the
calibration set is 128 x 2048 random token ids (`pruning_speed.build`). Each (pattern, GPU count)
runs in a fresh process that loads the model to the CPU, warms every GPU it uses up, then times only
the pruning call: `run_sequential(devices=[cuda:0, ...])` with `prune_layer` at the prune stage's
defaults (SparseGPT, 50% or 2:4, block 128, dampening 0.01, within_layer on), as the prune stage runs
it when `resources.num_gpus` is 2. It reads `torch.cuda.max_memory_allocated` of every GPU it used,
checks the sparsity (and every 2:4 group), and saves its masks; the parent then reports, per
pattern, the speedup of N GPUs over 1 and the fraction of mask bits that agree with 1 GPU's.

    python bench/pruning_multi_gpu.py --out-dir bench/results          # on a 2-GPU machine
    python bench/pruning_multi_gpu.py --tiny --device cpu --out-dir /tmp/x   # logic check, CPU "devices"

Results go to `<out-dir>/pruning_multi_gpu.json` (and the table to stdout), written after every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning_speed import LLAMA3_8B, TARGETS, TINY, _check, _versions, build  # noqa: E402

DIMS = {**LLAMA3_8B, "layers": 8}
TINY_DIMS = {**TINY, "layers": 3}


def _devices(kind: str, count: int) -> list:
    import torch

    if kind == "cuda":
        return [torch.device("cuda", i) for i in range(count)]
    return [torch.device("cpu")] * count


def _warm_up(devices) -> None:
    import torch

    for device in devices:
        if device.type == "cuda":
            a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
            (a @ a).float().sum().item()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)


def worker(args) -> dict:
    """One timed pruning run in this process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from safetensors.torch import load_file

    from pipelines.modelio import load_model
    from pipelines.pruning.engine import prune_layer
    from pipelines.pruning.patterns import pattern_sparsity
    from pipelines.pruning.sequential import run_sequential
    from pipelines.pruning.targets import resolve_targets
    from pipelines.recipe import SparseGPTPrune
    from pipelines.stages.prune import method_config

    devices = _devices(args.device, args.gpus)
    model = load_model(args.model, "cpu", torch.bfloat16)
    ids = load_file(args.calibration)["input_ids"]
    spec = SparseGPTPrune(pattern=args.pattern, within_layer=args.within_layer)  # stage defaults otherwise
    config = method_config(spec)
    sparsity = pattern_sparsity(0.5, spec.nm)
    masks: dict = {}
    damping: list[float] = []

    def on_layer(work) -> None:
        for outcome in prune_layer(work, config, sparsity):
            masks[outcome.name] = outcome.packed_mask
            damping.append(outcome.damping)

    log: list[str] = []  # the driver's own lines: devices, shards, seconds by phase
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: log.append(record.getMessage())
    driver_log = logging.getLogger("pipelines.pruning.multi_device")
    driver_log.addHandler(handler)
    driver_log.setLevel(logging.INFO)
    _warm_up(devices)
    start = time.perf_counter()
    targets = resolve_targets(model, [TARGETS], ["lm_head"])
    run_sequential(model, ids, targets, on_layer, devices=devices, batch_size=args.batch_size,
                   within_layer=spec.calibrate_within_layer, activations=args.activations)
    wall = time.perf_counter() - start
    peaks = [int(torch.cuda.max_memory_allocated(d)) if d.type == "cuda" else 0 for d in devices]
    torch.save(masks, args.masks_out)
    return {"wall_s": wall, "peak_gpu_mem_bytes": peaks, "max_damping": max(damping),
            "within_layer": spec.calibrate_within_layer, "driver_log": log, **_check(model, args.pattern)}


def mask_agreement(a_path: Path, b_path: Path) -> float:
    """Fraction of mask bits (over all pruned Linears) equal in two saved mask sets."""
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        return 0.0
    popcount = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    differ = total = 0
    for name, packed in a.items():
        differ += int(popcount[(packed ^ b[name]).long()].sum())
        total += packed.numel() * 8  # the padding bits are zero in both
    return 1.0 - differ / total


def _table(rows: list[dict]) -> str:
    lines = [f"{'pattern':<13} {'GPUs':>4} {'wall s':>8} {'speedup':>8} {'peak GiB per GPU':>20} "
             f"{'sparsity':>9} {'2:4 ok':>7} {'mask agree':>11}  status"]
    for r in rows:
        peaks = " ".join(f"{p / 2**30:.2f}" for p in r.get("peak_gpu_mem_bytes", []))
        lines.append(
            f"{r['pattern']:<13} {r['gpus']:>4} {r.get('wall_s', float('nan')):>8.1f} "
            f"{r.get('speedup', float('nan')):>8.2f} {peaks:>20} {r.get('sparsity', float('nan')):>9.4f} "
            f"{str(r.get('valid_2_4', '-')):>7} {r.get('mask_agreement', float('nan')):>11.6f}  {r.get('status', '')}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--calibration")
    parser.add_argument("--masks-out")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--gpus", type=int, default=1, help="worker: devices to use")
    parser.add_argument("--gpu-counts", default="1,2", help="comma list of GPU counts to compare (first = base)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--within-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="re-calibrate each shared-input group after the groups before it (default: the stage's)")
    parser.add_argument("--activations", default="host", choices=["host", "device"],
                        help="with several devices: keep each device's sample shard in pinned host memory or on it")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to check the logic")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-multi-gpu"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per worker")
    parser.add_argument("--deadline", type=float, default=330.0,
                        help="seconds for the whole bench, model building included: later runs are skipped")
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    dims = TINY_DIMS if args.tiny else DIMS
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir, calibration = build(args.work, dims, "cuda:0" if args.device == "cuda" else "cpu", seed=0)
    build_s = time.perf_counter() - start
    if args.device == "cuda":
        device_name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device_name = f"cpu ({os.cpu_count()} cores)"
    rows: list[dict] = []
    report = {
        "benchmark": "pruning_multi_gpu", "device": device_name, "dims": dims, "build_s": build_s,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"method": "sparsegpt", "sparsity": 0.5, "block_size": 128, "dampening": 0.01,
                     "dtype": "bfloat16", "batch_size": args.batch_size, "activations": args.activations,
                     "within_layer": "stage default" if args.within_layer is None else args.within_layer,
                     "timed": "pruning call only (model loaded on the CPU, every GPU used warmed up)"},
        "versions": _versions(), "rows": rows,
    }
    counts = [int(c) for c in args.gpu_counts.split(",")]
    for pattern in args.patterns.split(","):
        base = None
        for count in counts:
            masks = args.work / f"masks-{pattern.replace(':', '_')}-{count}.pt"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model_dir),
                   "--calibration", str(calibration), "--masks-out", str(masks), "--pattern", pattern,
                   "--gpus", str(count), "--device", args.device, "--batch-size", str(args.batch_size),
                   "--activations", args.activations]
            if args.within_layer is not None:
                cmd.append("--within-layer" if args.within_layer else "--no-within-layer")
            row: dict = {"pattern": pattern, "gpus": count}
            began = time.perf_counter()
            timeout = min(args.timeout, args.deadline - (began - start))
            try:
                if timeout < 20:
                    raise TimeoutError
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode == 0 and line:
                    row.update(json.loads(line.removeprefix("RESULT ")), status="ok")
                else:
                    row.update(status=f"failed rc={proc.returncode}", error=proc.stderr[-2000:])
            except subprocess.TimeoutExpired:
                row.update(status=f"timeout after {timeout:.0f} s")
            except TimeoutError:
                row.update(status="skipped: --deadline reached")
            row["process_s"] = time.perf_counter() - began
            if row["status"] == "ok":
                if base is None:
                    base = (row, masks)
                else:
                    row["speedup"] = base[0]["wall_s"] / row["wall_s"]
                    row["peak_vs_base"] = max(row["peak_gpu_mem_bytes"]) / max(max(base[0]["peak_gpu_mem_bytes"]), 1)
                    row["mask_agreement"] = mask_agreement(base[1], masks)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            if "error" in row:
                print(row["error"], flush=True)
            report["table"] = _table(rows).splitlines()
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "pruning_multi_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"device: {device_name}")
    print(_table(rows))


if __name__ == "__main__":
    main()
