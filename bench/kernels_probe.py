"""GPU probe: environment, correctness of every backend, and where the stock 2:4 path's time goes.

    PYTHONUNBUFFERED=1 python bench/kernels_probe.py --out $OUT

Writes `probe.json` (and profiler tables) under --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.backends import make_backends  # noqa: E402
from kernels.sparse24 import mask_24  # noqa: E402
from kernels.timing import device_info, time_calls  # noqa: E402

NAMES = ["dense", "torch-semi-structured", "cslt-direct", "cusparselt-planned"]


def host_us(fn, n=200) -> float:
    """Host-side microseconds per call (launch cost), synchronizing only at the end."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def profile_table(fn, n=20) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    dev = torch.device("cuda")
    report: dict = {"device": device_info(dev)}
    try:
        report["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()[-80:]
    except OSError as error:
        report["nvcc"] = str(error)
    from kernels.cslt import Cslt, build_shim, find_cusparselt

    try:
        report["cusparselt_paths"] = [str(p) for p in find_cusparselt()]
        t0 = time.time()
        report["shim"] = str(build_shim())
        report["shim_build_s"] = round(time.time() - t0, 2)
        report["shim_cusparselt_version"] = Cslt.load(dev).version
    except Exception:  # noqa: BLE001
        report["shim_error"] = traceback.format_exc()[-2000:]
    print(json.dumps(report, indent=1), flush=True)

    backends = make_backends(NAMES)
    report["available"] = {n: b.available(dev) for n, b in backends.items()}
    dtype = torch.float16
    # correctness, every backend vs dense (fp32 reference)
    rows = []
    for out_f, in_f in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = torch.randn(out_f, in_f, device=dev, dtype=dtype)
        m = mask_24(w)
        handles = {}
        for n, b in backends.items():
            if report["available"][n][0]:
                try:
                    handles[n] = b.prepare(w, m)
                except Exception as error:  # noqa: BLE001
                    rows.append({"shape": f"{out_f}x{in_f}", "backend": n, "error": f"prepare: {error}"})
        for t in [1, 7, 16, 128, 2048]:
            x = torch.randn(t, in_f, device=dev, dtype=dtype)
            ref = F.linear(x.float(), (w * m).float())
            for n, h in handles.items():
                try:
                    y = backends[n].linear(x, h)
                    rel = ((y.float() - ref).norm() / ref.norm()).item()
                    rows.append({"shape": f"{out_f}x{in_f}", "tokens": t, "backend": n, "rel_err": rel,
                                 "finite": bool(torch.isfinite(y).all())})
                except Exception as error:  # noqa: BLE001
                    rows.append({"shape": f"{out_f}x{in_f}", "tokens": t, "backend": n, "error": str(error)[:300]})
        if "cusparselt-planned" in handles and "cslt-direct" in handles:
            a, b = handles["cusparselt-planned"].data, handles["cslt-direct"].data
            report.setdefault("compress_equal_torch", {})[f"{out_f}x{in_f}"] = (
                a.numel() == b.numel() * b.element_size() and bool(torch.equal(a, b.view(torch.uint8).flatten()))
            )
        del handles
    report["correctness"] = rows

    # timing + overhead: stock vs direct vs planned vs dense
    timing_rows, profiles = [], {}
    for out_f, in_f in [(4096, 4096), (14336, 4096)]:
        w = torch.randn(out_f, in_f, device=dev, dtype=dtype)
        m = mask_24(w)
        handles = {n: backends[n].prepare(w, m) for n in NAMES if report["available"][n][0]}
        for t in [1, 16, 128, 2048]:
            x = torch.randn(t, in_f, device=dev, dtype=dtype)
            row = {"shape": f"{out_f}x{in_f}", "tokens": t}
            for n, h in handles.items():
                def fn(b=backends[n], h=h, x=x):
                    return b.linear(x, h)

                try:
                    row[n] = time_calls(lambda _i, f=fn: f(), warmup=5, repeats=30).median_ms
                    row[n + "_host_us"] = host_us(fn)
                    if out_f == 4096 and t in (16, 2048):
                        profiles[f"{n}|{out_f}x{in_f}|{t}"] = profile_table(fn)
                except Exception as error:  # noqa: BLE001
                    row[n] = None
                    row[n + "_error"] = str(error)[:300]
            # raw torch._cslt_sparse_mm with padded input, no wrappers, and the plan cost alone
            if "cslt-direct" in handles:
                packed = handles["cslt-direct"].data
                xp = F.pad(x, (0, 0, 0, (-t) % 8))
                def raw(packed=packed, xp=xp):
                    return torch._cslt_sparse_mm(packed, xp.t(), transpose_result=True)

                row["raw_cslt_mm"] = time_calls(lambda _i, raw=raw: raw(), warmup=5, repeats=30).median_ms
                row["raw_cslt_mm_host_us"] = host_us(raw)
            if "cusparselt-planned" in handles:
                lib = Cslt.load(dev)
                t0 = time.perf_counter()
                for _ in range(20):
                    lib.plan(out_f, in_f, t + (-t) % 8, dtype, dev).close()
                row["plan_create_us"] = (time.perf_counter() - t0) / 20 * 1e6
            timing_rows.append(row)
            print(json.dumps(row), flush=True)
        del handles
    report["timing"] = timing_rows
    (args.out / "profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in profiles.items()))

    # the config search, in its subprocess, including cuSPARSELt's own search
    from kernels.cslt_search import search_configs

    t0 = time.time()
    report["search"] = {f"{k[0]}x{k[1]}|{k[2]}": v for k, v in search_configs(
        [(4096, 4096, 16), (4096, 4096, 2048), (14336, 4096, 2048)], dtype, dev, library_search=True).items()}
    report["search_s"] = round(time.time() - t0, 1)
    (args.out / "probe.json").write_text(json.dumps(report, indent=1, default=str))

    print("\n== correctness (rel err vs fp32 reference; max over shapes/tokens)")
    for n in NAMES:
        errs = [r.get("rel_err") for r in rows if r["backend"] == n]
        bad = [r for r in rows if r["backend"] == n and ("error" in r or not r.get("finite", True))]
        print(f"{n:24s} max_rel_err={max([e for e in errs if e is not None], default=float('nan')):.2e} "
              f"failures={len(bad)} {bad[0].get('error', '')[:120] if bad else ''}")
    print("\n== per-call ms (CUDA events, median) | host us per call")
    hdr = ["dense", "torch-semi-structured", "cslt-direct", "raw_cslt_mm", "cusparselt-planned"]
    print(f"{'shape':>11s} {'T':>5s} " + " ".join(f"{h[:14]:>14s}" for h in hdr) + "   plan_us")
    for r in timing_rows:
        cells = " ".join(
            f"{(r.get(h) or float('nan')):7.4f}|{r.get(h + '_host_us', float('nan')):5.0f}" for h in hdr)
        print(f"{r['shape']:>11s} {r['tokens']:5d} {cells}   {r.get('plan_create_us', float('nan')):.0f}")
    print("\n== search", report["search_s"], "s")
    for k, v in report["search"].items():
        print(k, {kk: v.get(kk) for kk in ("alg_id", "split_k", "split_k_mode", "ms", "default_ms", "max_alg",
                                              "library_choice", "error")})


if __name__ == "__main__":
    main()
