"""SparseGPT's solve alone, per Llama-3-8B-shaped weight: the fused Triton block against the PyTorch loop.

For each pattern and weight shape (q/k/v stacked, o, gate/up stacked, down), a random bf16 weight and a
Hessian XᵀX/T from random correlated inputs are pruned by `prune_sparsegpt(fused=False)` and
`prune_sparsegpt(fused=True)`; the table gives the seconds of each (CUDA-synchronized, after one warm-up
call that also compiles the kernel), the speedup, the keep-mask agreement and the OBS loss of both.
`--sweep` also times one kernel launch per (rows_per_program, num_warps) on a [128, 28672] block.

    python bench/obs_block_speed.py --out-dir $OUT            # on the GPU machine
    TRITON_INTERPRET=1 python bench/obs_block_speed.py --tiny --device cpu   # logic check, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import obs_block  # noqa: E402
from pipelines.pruning.sparsegpt import prune_sparsegpt, solve_path  # noqa: E402

logger = logging.getLogger("obs_block_speed")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TINY = {"qkv": (48, 64), "down": (40, 96)}
PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


def problem(rows: int, columns: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 weight and an fp32 Hessian from 2 x columns random correlated tokens (some inputs dead)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = 2 * columns
    mix = torch.randn(columns, columns, generator=g, device=device) / columns**0.5
    mix += torch.eye(columns, device=device)
    x = torch.randn(tokens, columns, generator=g, device=device) @ mix
    x[:, :4] = 0
    hessian = x.t() @ x / tokens
    weight = torch.randn(rows, columns, generator=g, device=device).to(torch.bfloat16)
    return weight, hessian


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run_solves(shapes: dict, patterns: list[str], device: torch.device, act_order: bool) -> list[dict]:
    rows_out = []
    for pattern in patterns:
        nm = PATTERNS[pattern]
        small = problem(64, 256, device)
        prune_sparsegpt(*small, 0.5, nm, fused=True)  # compile outside the timing
        for name, (rows, columns) in shapes.items():
            weight, hessian = problem(rows, columns, device)
            ref, t_ref = timed(partial(prune_sparsegpt, weight, hessian, 0.5, nm, fused=False, act_order=act_order),
                               device)
            fused, t_fused = timed(partial(prune_sparsegpt, weight, hessian, 0.5, nm, fused=True, act_order=act_order),
                                   device)
            row = {"pattern": pattern, "weight": name, "shape": [rows, columns], "act_order": act_order,
                   "torch_s": t_ref, "fused_s": t_fused, "speedup": t_ref / t_fused,
                   "mask_agreement": (ref.mask == fused.mask).float().mean().item(),
                   "loss_torch": ref.loss.item(), "loss_fused": fused.loss.item(),
                   "auto_path": solve_path(device, nm)}
            logger.info(json.dumps(row))
            rows_out.append(row)
            del weight, hessian, ref, fused
    return rows_out


def run_sweep(device: torch.device, rows: int) -> list[dict]:
    """One 128-column unstructured and 2:4 block launch per (rows_per_program, num_warps), 20 repeats."""
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(128, 128, generator=g, device=device)
    hessian = a @ a.t() / 128 + torch.eye(128, device=device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    base = torch.randn(128, rows, generator=g, device=device)
    coef = (torch.rand(128, rows, generator=g, device=device) < 0.5).float()
    patterns = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                            dtype=torch.float32, device=device)
    alive = torch.ones(128, device=device)
    for kind in ("unstructured", "2:4"):
        for rpp in (16, 32, 64):
            for warps in (2, 4, 8):
                block, errors = base.clone(), torch.empty_like(base)
                keep = torch.ones(128, rows, dtype=torch.bool, device=device)

                def launch(block=block, errors=errors, keep=keep, rpp=rpp, warps=warps, kind=kind):
                    if kind == "unstructured":
                        obs_block.obs_block(block, u, errors, coef=coef, rows_per_program=rpp, num_warps=warps)
                    else:
                        obs_block.obs_block(block, u, errors, keep=keep, alive=alive, patterns=patterns, group=4,
                                            rows_per_program=rpp, num_warps=warps)

                launch()
                _, seconds = timed(lambda launch=launch: [launch() for _ in range(20)], device)
                row = {"kind": kind, "rows": rows, "rows_per_program": rpp, "num_warps": warps,
                       "us_per_block": seconds / 20 * 1e6}
                logger.info(json.dumps(row))
                out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--patterns", default="unstructured,2:4,4:8")
    parser.add_argument("--act-order", action="store_true", help="as the prune stage's default for 2:4")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations on one block")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    import triton

    report = {"benchmark": "obs_block_speed", "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
              "defaults": {"rows_per_program": obs_block.ROWS_PER_PROGRAM, "num_warps": obs_block.NUM_WARPS},
              "command": " ".join(sys.argv)}
    with torch.no_grad():
        report["solves"] = run_solves(TINY if args.tiny else SHAPES, args.patterns.split(","), device,
                                      args.act_order)
        if args.sweep:
            report["sweep"] = run_sweep(device, 64 if args.tiny else 28672)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "obs_block_speed_act_order.json" if args.act_order else "obs_block_speed.json"
    (args.out_dir / name).write_text(json.dumps(report, indent=2))
    logger.info("%-13s %-8s %16s %9s %9s %8s %10s", "pattern", "weight", "shape", "torch s", "fused s", "speedup",
                "agreement")
    for r in report["solves"]:
        shape = "x".join(map(str, r["shape"]))
        logger.info("%-13s %-8s %16s %9.3f %9.3f %8.1f %10.6f", r["pattern"], r["weight"], shape, r["torch_s"],
                    r["fused_s"], r["speedup"], r["mask_agreement"])


if __name__ == "__main__":
    main()
