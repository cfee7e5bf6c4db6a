"""Where a small `cutlass-sm90` call spends its time: host work per layer of the call vs GPU time.

Small token counts are bound by host time (Python, ctypes, CUTLASS's argument setup, the launch),
so this probe times, by wall clock over many calls on a problem too small to keep the GPU busy, each
layer of the call path separately, then the GPU time of a decode-sized call alone (replayed from a
CUDA graph, which also checks that the call can be captured).

    PYTHONUNBUFFERED=1 python bench/cutlass24_host_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.backends import CutlassSm90Backend, DenseBackend  # noqa: E402
from kernels.cutlass24 import KERNELS, Schedule  # noqa: E402
from kernels.plan import KernelChoice, SparseLinear  # noqa: E402
from kernels.sparse24 import mask_24  # noqa: E402
from kernels.timing import device_info, time_graph_us  # noqa: E402


def host_us(fn, calls: int = 3000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_us(fn, calls: int = 50, replays: int = 20) -> float:
    """GPU time per call with no host in the way: `calls` calls captured once, replayed."""
    return time_graph_us(lambda: [fn() for _ in range(calls)], calls, replays)


def wrapper_host_us(weight: torch.Tensor, backend: CutlassSm90Backend, decode: int) -> dict[str, float]:
    """What a tuned model's Linear costs the host per decode call against `nn.Linear`: a SparseLinear
    whose route at 1 token is dense (with and without a bias), and one whose route is our kernel."""
    out_f, in_f = weight.shape
    x = torch.randn(1, in_f, device=weight.device, dtype=weight.dtype)
    rows = {}
    for bias in (False, True):
        linear = torch.nn.Linear(in_f, out_f, bias=bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        backends = {"dense": DenseBackend(), backend.name: backend}
        routed = {name: SparseLinear(linear, None, {1: KernelChoice(backend=name, config=config),
                                                    2048: KernelChoice(backend=backend.name)}, backends)
                  for name, config in (("dense", {}), (backend.name, {"kernel": decode}))}
        tag = ", bias" if bias else ""
        rows[f"nn.Linear{tag}"] = host_us(lambda linear=linear: linear(x))
        rows[f"SparseLinear, dense route{tag}"] = host_us(lambda m=routed["dense"]: m(x))
        rows[f"SparseLinear, {backend.name} route{tag}"] = host_us(lambda m=routed[backend.name]: m(x))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    backend = CutlassSm90Backend()
    ok, why = backend.available(dev)
    if not ok:
        raise SystemExit(why)
    lib = backend._lib(dev)
    decode = next(i for i, k in enumerate(KERNELS) if k.stream_k and k.tile_n == 16)
    persistent = next(i for i, k in enumerate(KERNELS) if not k.stream_k)
    result: dict = {"device": device_info(dev), "kernels": {"decode": KERNELS[decode].name,
                                                            "persistent": KERNELS[persistent].name}}

    # host cost: a problem the GPU finishes in a few microseconds
    w = torch.randn(256, 256, device=dev, dtype=dtype)
    w = w * mask_24(w)
    x = torch.randn(1, 256, device=dev, dtype=dtype)
    handle = backend.prepare(w, None, {1: {"kernel": decode}})
    values, meta = handle.data.values, handle.data.meta
    schedule = Schedule()
    out = torch.empty(1, 256, device=dev, dtype=dtype)
    _, gemm = lib._kernels[(dtype, decode)]
    nbytes = lib.workspace_bytes(dtype, decode, 256, 1, 256, schedule)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    raw_args = (256, 1, 256, values.data_ptr(), meta.data_ptr(), x.data_ptr(), out.data_ptr(), ws.data_ptr(), nbytes,
                *schedule, 0, lib.sm_count, stream)
    _, gemm_p = lib._kernels[(dtype, persistent)]
    nbytes_p = lib.workspace_bytes(dtype, persistent, 256, 1, 256, schedule)
    raw_p = (*raw_args[:7], ws.data_ptr(), nbytes_p, *raw_args[9:])
    result["host_us_per_call"] = {
        "F.linear (dense)": host_us(lambda: F.linear(x, w)),
        "torch.cuda.current_stream().cuda_stream": host_us(lambda: torch.cuda.current_stream(dev).cuda_stream),
        "torch.empty": host_us(lambda: torch.empty(1, 256, device=dev, dtype=dtype)),
        "ctypes call, stream-K decode kernel": host_us(lambda: gemm(*raw_args)),
        "ctypes call, persistent kernel": host_us(lambda: gemm_p(*raw_p)),
        "Sparse24Sm90.linear": host_us(lambda: lib.linear(x, values, meta, 256, decode, schedule)),
        "backend.linear (plan route)": host_us(lambda: backend.linear(x, handle)),
        **wrapper_host_us(w, backend, decode),
    }
    print(json.dumps(result["host_us_per_call"], indent=1))

    # GPU time of decode-sized calls on Llama shapes, host removed (CUDA graph replay)
    rows = []
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)):
        w = torch.randn(n, k, device=dev, dtype=dtype)
        w = w * mask_24(w)
        x = torch.randn(1, k, device=dev, dtype=dtype)
        h = backend.prepare(w, None, {1: {"kernel": decode}})
        row = {"shape": f"{n}x{k}", "tokens": 1, "dense_us": graph_us(lambda w=w, x=x: F.linear(x, w)),
               "own_us": graph_us(lambda h=h, x=x: backend.linear(x, h)),
               "dense_host_bound_us": host_us(lambda w=w, x=x: F.linear(x, w), 500),
               "own_host_bound_us": host_us(lambda h=h, x=x: backend.linear(x, h), 500)}
        y, ref = backend.linear(x, h), F.linear(x.float(), w.float())
        row["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        rows.append(row)
        print(row)
    result["graph_rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cutlass24_host_probe.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
