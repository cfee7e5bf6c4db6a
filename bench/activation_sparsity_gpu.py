"""FFN decode speed with activation sparsity on a GPU: a sparse down projection that skips inactive neurons vs dense.

Llama-3-8B FFN dims (hidden 4096, intermediate 14336), random fp16 weights. Per activation sparsity s
(by default the critical sparsities measured on SmolLM2-135M in `bench/results/activation_sparsity.json`,
plus 0.5, 0.7 and 0.9 for context), the threshold is the s-quantile of |h| over 256 calibration tokens;
the timed tokens are fresh. For 1, 4 and 16 tokens:

1. check: the kernel (every tile config) against a float64 dense reference (relative error < 1e-2,
   fp16 and bf16), and the union of active neurons against torch;
2. time, with CUDA events around CUDA-graph replays (median of replays; each replay runs the step on
   4 layers' worth of distinct weights, so the down weights (470 MB) do not sit in the 50 MB L2):
   the down projection alone (dense `F.linear` vs the sparse kernel, thresholding included), and the whole
   FFN (fused gate/up `F.linear`, SiLU, product, then dense or sparse down).

Only torch, triton and `kernels.activation_sparse` are imported (the GPU machine has no sparseflow deps).

    python bench/activation_sparsity_gpu.py --out $OUT/activation_sparsity_gpu.json
    TRITON_INTERPRET=1 python bench/activation_sparsity_gpu.py --check-only --device cpu --hidden 64 \
        --intermediate 256       # the correctness part on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.activation_sparse import (  # noqa: E402
    KernelConfig,
    SparseDown,
    active_columns,
    dense_down,
    launch_sparse_down,
)
from kernels.timing import time_graph_us  # noqa: E402

CPU_RESULTS = Path(__file__).resolve().parent / "results" / "activation_sparsity.json"
CONFIGS = [KernelConfig(n, k, rows, warps) for n, k, rows, warps in (
    (32, 32, 512, 1), (16, 64, 1024, 1), (32, 64, 1024, 2), (128, 32, 128, 2), (512, 32, 64, 4),
    (64, 32, 256, 2))]
LAYERS = 4


def measured_sparsities() -> dict[str, float]:
    """Critical sparsities of the dense SmolLM2 run (uniform and per-layer allocation), by label."""
    if not CPU_RESULTS.is_file():
        return {}
    report = json.loads(CPU_RESULTS.read_text())["models"]["dense"]["report"]
    found = {}
    for tol, value in report["uniform"]["critical"].items():
        found[f"critical@{float(tol):.0%} uniform"] = round(value, 3)
    for tol, value in report["allocation"]["critical"].items():
        found[f"critical@{float(tol):.0%} per-layer"] = round(value, 3)
    return found


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check(hidden: int, intermediate: int, device: torch.device, configs: list[KernelConfig]) -> list[dict]:
    """Kernel vs float64 dense, fresh random inputs per case; raises on a mismatch."""
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        if device.type == "cpu" and dtype == torch.bfloat16:
            continue  # the Triton interpreter mishandles bf16 dots
        for tokens in (1, 4, 16):
            for sparsity in (0.0, 0.5, 0.9):
                h = torch.randn(tokens, intermediate, device=device, dtype=dtype)
                weight = torch.randn(hidden, intermediate, device=device, dtype=dtype) / intermediate**0.5
                t = torch.quantile(h.float().abs().flatten(), sparsity).item() if sparsity else 0.0
                ref = dense_down(h.double(), weight.double(), None, t)
                idx, count = active_columns(h, t)
                expected = torch.nonzero((h.abs() >= t).any(0)).flatten()
                assert torch.equal(idx[: int(count)].long(), expected), "active_columns disagrees with torch"
                down = SparseDown.from_dense(weight)
                for cfg in configs:
                    out = launch_sparse_down(h, down, t, cfg)
                    err = _rel(out, ref)
                    if not (err < 1e-2 and torch.isfinite(out).all()):
                        raise AssertionError(f"mismatch {dtype} tokens={tokens} s={sparsity} {cfg}: {err:.2e}")
                    rows.append({"dtype": str(dtype), "tokens": tokens, "sparsity": sparsity, "config": vars(cfg),
                                 "rel_err": err})
                    again = launch_sparse_down(h, down, t, cfg)  # the kernel reset its workspace: same result
                    if not _rel(again, out.double()) < 2e-3:
                        raise AssertionError(f"second call differs {dtype} tokens={tokens} s={sparsity} {cfg}")
    return rows


class FFNs:
    """`LAYERS` random FFNs of one shape (fused gate/up weight, down weight and its kernel-ready copy)."""

    def __init__(self, hidden: int, inter: int, device: torch.device, dtype: torch.dtype) -> None:
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.hidden, self.inter, self.device, self.dtype = hidden, inter, device, dtype
        self.gate_up = [self.rand(2 * inter, hidden, scale=hidden**-0.5) for _ in range(LAYERS)]
        self.down = [self.rand(hidden, inter, scale=inter**-0.5) for _ in range(LAYERS)]
        self.sparse = [SparseDown.from_dense(w) for w in self.down]

    def rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        out = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale
        return out.to(self.dtype)

    def act(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[layer]).chunk(2, dim=-1)
        return F.silu(gate) * up


def _timed(fn, reps: int) -> float:
    """Median us of `fn(layer)`, over graph replays of 2 passes over the layers."""

    def step() -> None:
        for _ in range(2):
            for layer in range(LAYERS):
                fn(layer)

    return time_graph_us(step, 2 * LAYERS, reps)


def _case(ffns: FFNs, label: str, s: float, threshold: float, tokens: int, reps: int) -> dict:
    xs = [ffns.rand(tokens, ffns.hidden) for _ in range(LAYERS)]
    with torch.no_grad():
        hs = [ffns.act(x, i) for i, x in enumerate(xs)]
    token_sparsity = statistics.mean(float((h.float().abs() < threshold).float().mean()) for h in hs)
    union_active = statistics.mean(int(active_columns(h, threshold)[1]) / ffns.inter for h in hs)
    timings = {cfg: _timed(lambda i, cfg=cfg: launch_sparse_down(hs[i], ffns.sparse[i], threshold, cfg), 20)
               for cfg in CONFIGS}
    cfg = min(timings, key=timings.get)
    out = launch_sparse_down(hs[0], ffns.sparse[0], threshold, cfg)
    err = _rel(out, dense_down(hs[0].double(), ffns.down[0].double(), None, threshold))
    assert err < 1e-2, f"check before timing failed: {err:.2e}"
    row = {
        "label": label, "sparsity": s, "threshold": threshold, "tokens": tokens,
        "token_sparsity": token_sparsity, "union_active_fraction": union_active, "rel_err": err,
        "config": vars(cfg), "config_sweep_us": {str(vars(c)): t for c, t in timings.items()},
        "down_dense_us": _timed(lambda i: F.linear(hs[i], ffns.down[i]), reps),
        "down_sparse_us": _timed(lambda i: launch_sparse_down(hs[i], ffns.sparse[i], threshold, cfg), reps),
        "ffn_dense_us": _timed(lambda i: F.linear(ffns.act(xs[i], i), ffns.down[i]), reps),
        "ffn_sparse_us": _timed(lambda i: launch_sparse_down(ffns.act(xs[i], i), ffns.sparse[i], threshold, cfg),
                                reps),
    }
    row["down_speedup"] = row["down_dense_us"] / row["down_sparse_us"]
    row["ffn_speedup"] = row["ffn_dense_us"] / row["ffn_sparse_us"]
    print(f"  {label:<24} s={s:.3f} tokens={tokens:>2}: down {row['down_dense_us']:.1f} -> "
          f"{row['down_sparse_us']:.1f} us, ffn {row['ffn_dense_us']:.1f} -> {row['ffn_sparse_us']:.1f} us", flush=True)
    return row


def bench(args, sparsities: dict[str, float]) -> list[dict]:
    ffns = FFNs(args.hidden, args.intermediate, torch.device("cuda"), torch.float16)
    with torch.no_grad():
        calib = torch.cat([ffns.act(ffns.rand(256, args.hidden), i) for i in range(LAYERS)]).float().abs().flatten()
    rows = []
    for label, s in sparsities.items():
        threshold = torch.quantile(calib[:16_000_000], s).item() if s > 0 else 0.0
        for tokens in args.tokens:
            rows.append(_case(ffns, label, s, threshold, tokens, args.reps))
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'sparsity':<26} {'s':>5} {'tok':>3} {'tok sp':>6} {'active':>6} {'down dense':>10} "
             f"{'down sparse':>11} {'speedup':>7} {'ffn dense':>9} {'ffn sparse':>10} {'speedup':>7}"]
    for r in rows:
        lines.append(f"{r['label']:<26} {r['sparsity']:>5.3f} {r['tokens']:>3} {r['token_sparsity']:>6.3f} "
                     f"{r['union_active_fraction']:>6.3f} {r['down_dense_us']:>8.1f}us {r['down_sparse_us']:>9.1f}us "
                     f"{r['down_speedup']:>6.2f}x {r['ffn_dense_us']:>7.1f}us {r['ffn_sparse_us']:>8.1f}us "
                     f"{r['ffn_speedup']:>6.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sparsities", type=float, nargs="*", default=None, help="Default: measured + 0.5 0.7 0.9.")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" /
                        "activation_sparsity_gpu.json")
    args = parser.parse_args()
    import triton

    device = torch.device(args.device)
    checks = check(min(args.hidden, 1024), min(args.intermediate, 2048), device, CONFIGS)
    print(f"check: {len(checks)} kernel runs match float64 dense (max rel err "
          f"{max(c['rel_err'] for c in checks):.2e})", flush=True)
    if args.check_only:
        return
    sparsities = measured_sparsities()
    if args.sparsities is not None:
        sparsities.update({f"given {s:g}": s for s in args.sparsities})
    else:
        sparsities.update({"reference 0.5": 0.5, "reference 0.7": 0.7, "reference 0.9": 0.9})
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}; fp16; hidden {args.hidden}, intermediate {args.intermediate}", flush=True)
    rows = bench(args, sparsities)
    text = table(rows)
    result = {
        "benchmark": "activation_sparsity_gpu",
        "command": " ".join(["python", *sys.argv]),
        "device": {"name": name, "capability": list(torch.cuda.get_device_capability(device)),
                   "multiprocessors": torch.cuda.get_device_properties(device).multi_processor_count},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda},
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "dtype": "float16", "layers": LAYERS},
        "timing": "median of CUDA-graph replays (CUDA events), per call; each replay runs 2 x 4 layers",
        "sparsities": sparsities,
        "checks": checks,
        "rows": rows,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"device: {name}")
    print(text)


if __name__ == "__main__":
    main()
