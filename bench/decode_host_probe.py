"""Probe: where an eager decode step's host time goes, dense against the tuned 2:4 models.

Eager decode of a small model is paced by the host (the GPU finishes each small op before the next is
queued), so a tuned model is only as fast as its Python. On the 4-layer Llama-3-8B-shaped model of
`bench/fp8_kernels_bench.py`: dense bf16, a deep copy of it (the tuned models are copies), a copy whose decoder
Linears are `SparseLinear`s routed dense (the wrapper alone), the bf16 2:4 plan and the FP8 2:4 plan. Per
decode step:

- the step's time on the GPU's clock (CUDA events), the models taking turns step by step in blocks of 32
  steps (`bench/kernels_bench.interleaved_decode`), and on the host's (the Python call alone);
- a cProfile of the steps: every function's own host time, per step, the Linear forwards side by side;
- one Linear call at 1 token, host time, for each tuned layer against the `nn.Linear` it replaced;
- what asking whether the stream is capturing costs.

    PYTHONUNBUFFERED=1 python bench/decode_host_probe.py --out $OUT     # on an H200
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fp8_kernels_bench import TOKENS, e2e_models  # noqa: E402
from bench.kernels_bench import interleaved_decode  # noqa: E402
from kernels.autotune import TuneSettings  # noqa: E402
from kernels.backends import make_backends  # noqa: E402
from kernels.plan import KernelChoice, SparseLinear  # noqa: E402
from kernels.timing import device_info  # noqa: E402


def decode_steps(m, cfg, dev: torch.device, steps: int, prompt: int = 128) -> list[float]:
    """Host milliseconds of each eager decode step's call (the launches only; synchronized after)."""
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=dev, generator=torch.Generator(dev).manual_seed(2))
    times = []
    with torch.no_grad():
        out = m(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        for _ in range(steps):
            start = time.perf_counter()
            out = m(nxt, past_key_values=past, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    return times


def profile_steps(m, cfg, dev: torch.device, steps: int) -> dict:
    """Own host time per step of the functions that take the most, and of the Linear forwards."""
    profiler = cProfile.Profile()
    profiler.enable()
    decode_steps(m, cfg, dev, steps)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}({name})", "calls_per_step": calls / steps,
             "own_us_per_step": own / steps * 1e6, "total_us_per_step": total / steps * 1e6}
            for (file, line, name), (_, calls, own, total, _) in stats.items()]
    rows.sort(key=lambda r: -r["own_us_per_step"])
    linear = [r for r in rows if r["function"].startswith(("linear.py", "plan.py")) and "forward" in r["function"]]
    return {"top": rows[:20], "linear_forwards": linear,
            "own_us_per_step_all": sum(r["own_us_per_step"] for r in rows)}


def wrapped_dense(model):
    """A copy of `model` whose decoder Linears are `SparseLinear`s routed dense in both modes up to 512 tokens:
    what the wrapper alone costs against `nn.Linear`, with the same GPU work."""
    wrapped = copy.deepcopy(model)
    backends = make_backends(["dense", "sparse24-reference"])
    choices = {512: KernelChoice(backend="dense"), 8192: KernelChoice(backend="sparse24-reference")}
    for name, module in list(wrapped.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parent, _, child = name.rpartition(".")
            setattr(wrapped.get_submodule(parent), child, SparseLinear(module, None, choices, backends))
    return wrapped


def call_host_us(module, x: torch.Tensor, calls: int = 2000) -> float:
    """Median host microseconds per call over 5 batches of `calls` (launches queue; synchronized between)."""
    batches = []
    with torch.no_grad():
        for _ in range(6):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    t0 = time.time()
    info = device_info(dev)
    settings = TuneSettings(tokens=tuple(TOKENS), dtype=torch.bfloat16, repeats=20, search_configs=False,
                            backends=("dense", "cutlass-sm90", "dense-fp8", "cutlass-sm90-fp8"))
    cfg, models, facts = e2e_models({}, settings, dev)
    result: dict = {"benchmark": "decode_host_probe", "device": info, "command": " ".join(sys.argv),
                    "versions": {k: info.get(k) for k in ("torch", "cuda", "driver", "python")}, **facts}
    models["dense_copy"] = copy.deepcopy(models["dense"])  # the tuned models are copies too
    models["dense_wrapped"] = wrapped_dense(models["dense"])
    labels = list(models)
    interleaved_decode(models, cfg, dev, steps=32)  # warm-up
    gpu_ms: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.blocks):
        for label, times in interleaved_decode(models, cfg, dev, steps=args.steps).items():
            gpu_ms[label] += times
    for label in labels:
        result[f"{label}_decode_ms"] = statistics.median(gpu_ms[label])
        if label != "dense":
            pairs = [d / t for d, t in zip(gpu_ms["dense"], gpu_ms[label], strict=True)]
            result[f"{label}_decode_x"] = statistics.median(pairs)
            result[f"{label}_decode_pair_quartiles"] = [round(q, 4) for q in statistics.quantiles(pairs, n=4)]
        result[f"{label}_decode_host_ms"] = statistics.median(decode_steps(models[label], cfg, dev, 4 * args.steps))
        result[f"{label}_profile"] = profile_steps(models[label], cfg, dev, args.steps)
    layers: dict[str, dict] = {}
    dense_modules = dict(models["dense"].named_modules())
    for label in ("bf16_24", "fp8_24", "dense_wrapped"):
        for name, module in models[label].named_modules():
            if not isinstance(module, SparseLinear) or not name.startswith("model.layers.0."):
                continue
            x = torch.randn(1, 1, module.in_features, device=dev, dtype=torch.bfloat16)
            layers[f"{label}:{name}"] = {
                "shape": f"{module.out_features}x{module.in_features}",
                "eager_route": module.backend_for(1), "graphed_route": module.backend_for(1, graphed=True),
                "tuned_us": call_host_us(module, x), "nn_linear_us": call_host_us(dense_modules[name], x)}
    result["layer_calls_1_token"] = layers
    start = time.perf_counter()
    for _ in range(100_000):
        torch.cuda.is_current_stream_capturing()
    result["is_current_stream_capturing_us"] = (time.perf_counter() - start) / 100_000 * 1e6
    result["elapsed_s"] = round(time.time() - t0, 1)
    (args.out / "decode_host_probe.json").write_text(json.dumps(result, indent=1, default=str))
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
               if k.endswith(("_x", "_ms", "_us")) and not isinstance(v, list)}
    print(json.dumps(summary, indent=1))
    for key, row in layers.items():
        print(key, row)
    for label in labels:
        print(label, [(r["function"], round(r["own_us_per_step"], 1), r["calls_per_step"])
                      for r in result[f"{label}_profile"]["linear_forwards"]])


if __name__ == "__main__":
    main()
