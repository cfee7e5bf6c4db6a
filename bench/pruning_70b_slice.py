"""SparseGPT through the streaming prune on a Llama-3-70B-shaped slice: time per layer, peak GPU and host memory.

The model is a Llama stack with the dimensions of Llama-3-70B (hidden 8192, MLP 28672, 64 heads,
8 KV heads; 3 decoder layers by default: the first, which also holds the setup, one middle layer
and the last, which propagates nothing; vocab 32000, tied embeddings), random bf16 weights (normal,
std 0.02; norms 1) written straight to safetensors shards, one per layer, without ever building the
model in memory. The calibration set is 128 x 2048 random token ids. Each pattern (unstructured 50%,
2:4) runs in a fresh process that calls the prune stage itself (`pipelines.stages.prune.run` with
`streaming: true`, `dtype: bfloat16`, `export: none`, the stage's SparseGPT defaults), so what is
timed is the path a job takes: skeleton, embedding capture, then per layer read from the mmapped
checkpoint onto the GPU, calibrate, prune, propagate, write the pruned shard.

Reported per run: wall time of the stage; time of each layer (between the stage's progress calls,
which come after the layer's shard is written; the first also holds the setup: skeleton, copying
the embeddings shard, the capture); the read and write seconds per layer; `peak_gpu_mem_bytes`
(torch.cuda.max_memory_allocated); the peak host RSS (VmHWM, reset once the process is warm) and its
growth over the RSS before the stage. After timing, each worker reads the written shards back onto
the device and checks the sparsity of the pruned Linears and, for 2:4, that every group is valid.

    python bench/pruning_70b_slice.py --out-dir $OUT                  # on the GPU machine
    python bench/pruning_70b_slice.py --tiny --device cpu --out-dir /tmp/x   # logic check, tiny sizes

Results go to `<out-dir>/pruning_70b_slice.json` (and a table to stdout), one row per run, written
after every run so a run cut short still reports what finished, with the projection to a whole
70B and 405B model of `bench/scaling_projection.py` (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_70B = {"hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8, "layers": 3, "vocab": 32000,
              "samples": 128, "seq_len": 2048}
TINY = {"hidden": 64, "mlp": 128, "heads": 4, "kv_heads": 2, "layers": 3, "vocab": 512, "samples": 8, "seq_len": 64}


def build(work: Path, dims: dict, device: str, seed: int) -> tuple[Path, Path]:
    """A random bf16 Llama model folder (one shard per decoder layer, plus an index) and calibration ids."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from pipelines.modelio import finish_config

    config = LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["mlp"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=max(8192, dims["seq_len"]), rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model_dir = work / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    config.save_pretrained(model_dir)
    finish_config(model_dir / "config.json", torch.bfloat16)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embeddings
    generator = torch.Generator(device).manual_seed(seed)
    shards: list[list[str]] = [[n for n in shapes if ".layers." not in n]]
    shards += [[n for n in shapes if f".layers.{i}." in n] for i in range(dims["layers"])]
    weight_map, total = {}, 0
    for s, names in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
                tensor.normal_(0.0, 0.02, generator=generator)
                tensor = tensor.cpu()
            tensors[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(model_dir / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    ids = torch.randint(0, dims["vocab"], (dims["samples"], dims["seq_len"]),
                        generator=torch.Generator().manual_seed(seed))
    calibration = work / "calibration.safetensors"
    save_file({"input_ids": ids}, str(calibration))
    return model_dir, calibration


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(key)).split()[1]) * 1024


def _warm_up(device) -> None:
    import torch

    if device.type == "cuda":
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        torch.linalg.cholesky(torch.eye(256, device=device)).sum().item()
        torch.cuda.synchronize(device)


class _Timer:
    """Wraps a function of a module with wall-clock timing (after a device sync), summed per call."""

    def __init__(self, device):
        self.device, self.seconds = device, []

    def wrap(self, fn):
        import torch

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds.append(time.perf_counter() - start)
            return out

        return timed


def _check(out_dir: Path, pattern: str, device) -> dict:
    """Sparsity of the written decoder Linears and, for 2:4, whether every group of four keeps at most two."""
    from pipelines.streamio import CheckpointReader

    reader = CheckpointReader(out_dir)
    zeros = total = 0
    valid = True
    for name in reader.names():
        if ".layers." not in name or "_proj" not in name:
            continue
        w = reader.read([name], device)[name]
        zeros += int((w == 0).sum())
        total += w.numel()
        if pattern == "2:4":
            valid &= bool((w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())
    return {"sparsity": zeros / max(total, 1), "valid_2_4": valid if pattern == "2:4" else None}


def _steady(layer_s: list[float]) -> float:
    """Mean time of a layer that is neither the first (which holds the setup) nor the last (which
    propagates nothing): the time each of the 78 middle layers of an 80-layer model takes."""
    middle = layer_s[1:-1] or layer_s[-1:]
    return sum(middle) / len(middle)


def worker(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import pipelines.pruning.streaming as streaming
    from pipelines.recipe import DataSpec, prune_stage
    from pipelines.stage import StageContext
    from pipelines.stages.prune import run
    from pipelines.streamio import ShardWriter

    device = torch.device(args.device)
    _warm_up(device)
    spec = prune_stage(method="sparsegpt", pattern=args.pattern, streaming=True, dtype="bfloat16",
                       batch_size=args.batch_size, export="none", **({"sparsity": 0.5}
                                                                      if args.pattern == "unstructured" else {}))
    reads, writes, capture = _Timer(device), _Timer(device), _Timer(device)
    streaming.load_layer = reads.wrap(streaming.load_layer)
    streaming._capture = capture.wrap(streaming._capture)
    ShardWriter.put = writes.wrap(ShardWriter.put)
    marks: list[float] = []
    out = Path(args.work) / f"out-{args.pattern.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    ctx = StageContext(workdir=out, inputs={"model": Path(args.model), "calibration": Path(args.calibration)},
                       data=DataSpec(), device=device, progress=lambda d, t, m: marks.append(time.perf_counter()))
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS, so the peak below is the stage's
        hwm_reset = True
    except OSError:  # not allowed here: the peak also covers the imports and the warm-up
        hwm_reset = False
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    result = run(spec, ctx)
    wall = time.perf_counter() - start
    peak_rss = _status_bytes("VmHWM")
    layer_s = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)]
    metrics = {m.name: m.value for m in result.metrics}
    solve_s = [0.0] * len(layer_s)
    for name, value in metrics.items():
        if name.startswith("time_s."):
            solve_s[int(name.split(".layers.")[1].split(".")[0])] += value
    row = {
        "wall_s": wall, "layer_s": layer_s, "steady_layer_s": _steady(layer_s), "solve_layer_s": solve_s,
        "capture_s": sum(capture.seconds), "read_layer_s": reads.seconds, "write_rest_s": writes.seconds[0],
        "write_layer_s": writes.seconds[1:],
        "peak_gpu_mem_bytes": int(metrics["peak_gpu_mem_bytes"]), "peak_host_rss_bytes": peak_rss,
        "host_rss_before_bytes": rss_before, "host_rss_growth_bytes": peak_rss - rss_before, "hwm_reset": hwm_reset,
        "max_damping": max((v for k, v in metrics.items() if k.startswith("damping.")), default=None),
        "streaming_reason": json.loads(result.outputs["report"].read_text())["streaming_reason"],
    }
    row.update(_check(result.outputs["model"], args.pattern, device))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'pattern':<13} {'wall s':>8} {'s/layer':>8} {'1st s':>7} {'read s':>7} {'write s':>8} "
             f"{'GPU GiB':>8} {'host GiB':>9} {'+host GiB':>10} {'sparsity':>9} {'2:4 ok':>7}  status"]
    for r in rows:
        reads, writes = r.get("read_layer_s") or [float("nan")], r.get("write_layer_s") or [float("nan")]
        lines.append(
            f"{r['pattern']:<13} {r.get('wall_s', float('nan')):>8.1f} {r.get('steady_layer_s', float('nan')):>8.1f} "
            f"{(r.get('layer_s') or [float('nan')])[0]:>7.1f} {sum(reads) / len(reads):>7.2f} "
            f"{sum(writes) / len(writes):>8.2f} {r.get('peak_gpu_mem_bytes', 0) / gib:>8.2f} "
            f"{r.get('peak_host_rss_bytes', 0) / gib:>9.2f} {r.get('host_rss_growth_bytes', 0) / gib:>10.2f} "
            f"{r.get('sparsity', float('nan')):>9.4f} {str(r.get('valid_2_4', '-')):>7}  {r.get('status', '')}"
        )
    return "\n".join(lines)


def projection_table(report: dict) -> str:
    """The whole-model projection of `bench/scaling_projection.py` (a sibling script, not a package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scaling_projection import table

    return table(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--calibration")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--patterns", default="unstructured,2:4", help="comma list of the runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, help="decoder layers (default 3, as tiny)")
    parser.add_argument("--samples", type=int, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, help="calibration sequence length (default 2048)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to check the logic")
    parser.add_argument("--keep", action="store_true", help="keep the pruned output folders")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseflow-bench-70b-slice"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per worker")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds for the build and all workers together")
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    dims = dict(TINY if args.tiny else LLAMA3_70B)
    for key in ("layers", "samples", "seq_len"):
        if getattr(args, key) is not None:
            dims[key] = getattr(args, key)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir, calibration = build(args.work, dims, args.device, seed=0)
    build_s = time.perf_counter() - start
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows: list[dict] = []
    report = {
        "benchmark": "pruning_70b_slice", "device": device_name, "dims": dims, "build_s": build_s,
        "checkpoint_bytes": weight_bytes, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"method": "sparsegpt", "sparsity": 0.5, "block_size": 128, "dampening": 0.01,
                     "dtype": "bfloat16", "batch_size": args.batch_size, "streaming": True,
                     "timed": "the prune stage (pipelines.stages.prune.run), GPU warmed up"},
        "versions": _versions(), "rows": rows,
    }
    for pattern in args.patterns.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model_dir),
               "--calibration", str(calibration), "--pattern", pattern, "--device", args.device,
               "--batch-size", str(args.batch_size), "--work", str(args.work), *(["--keep"] if args.keep else [])]
        row = {"pattern": pattern}
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
        report["projection"] = projection_table(report).splitlines()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "pruning_70b_slice.json").write_text(json.dumps(report, indent=2))
    print(f"device: {device_name}; build {build_s:.1f} s; checkpoint {weight_bytes / 1e9:.2f} GB")
    print(_table(rows))
    print(projection_table(report))


if __name__ == "__main__":
    main()
