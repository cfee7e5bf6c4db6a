"""Where the time of the activation-sparse down kernel goes: the same call with every neuron needed,
half, and none (no weight row read at all), per tile config, CUDA-graph timed, vs dense `F.linear`.

    python bench/activation_kernel_probe.py     # on a GPU; prints one line per config
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_sparsity_gpu import graph_time_us  # noqa: E402

from kernels.activation_sparse import KernelConfig, SparseDown, launch_sparse_down  # noqa: E402

CONFIGS = {
    1: [KernelConfig(n, k, rows, warps) for n, k, rows, warps in (
        (32, 32, 512, 1), (32, 256, 256, 4), (32, 512, 512, 4), (64, 256, 256, 4), (64, 128, 512, 4),
        (128, 128, 256, 4), (32, 128, 512, 2), (16, 512, 512, 4), (64, 512, 512, 8), (128, 64, 1024, 4))],
    4: [KernelConfig(n, k, rows, warps) for n, k, rows, warps in (
        (128, 32, 128, 2), (64, 32, 256, 2), (256, 32, 128, 4), (128, 64, 256, 4))],
}


def main() -> None:
    hidden, inter, layers = 4096, 14336, 4
    downs = [torch.randn(hidden, inter, device="cuda", dtype=torch.float16) * inter**-0.5 for _ in range(layers)]
    sparse = [SparseDown.from_dense(w) for w in downs]
    for tokens in (1, 4):
        hs = [torch.randn(tokens, inter, device="cuda", dtype=torch.float16) for _ in range(layers)]
        dense = graph_time_us(lambda hs=hs: [F.linear(h, w) for h, w in zip(hs, downs, strict=True)], layers, 30)
        print(f"tokens {tokens}: dense {dense:.1f} us", flush=True)
        for cfg in CONFIGS[tokens]:
            times = {}
            for label, threshold in (("all", 0.0), ("half", 0.6745), ("none", 1e9)):
                times[label] = graph_time_us(
                    lambda t=threshold, c=cfg, hs=hs: [launch_sparse_down(h, d, t, c)
                                                       for h, d in zip(hs, sparse, strict=True)],
                    layers, 30)
            print(f"  {vars(cfg)}: " + "  ".join(f"{k} {v:.1f} us" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
