"""How many CPU threads a solver's loop of small ops gets.

SparseGPT's column loop issues a few small ops per column, thousands per Linear. With several OpenMP
threads every op ends at a barrier, and on a machine shared with other processes a thread that is
descheduled stalls the others at each one. Measured on 2 shared cores (load average about 6): the 2:4
solve of a [3072, 576] weight took 9.4 s with 2 threads and 0.5 s with 1, a [576, 1536] one 9.6 s
and 0.75 s; unstructured solves were no slower with 1 thread. So on the CPU such a loop gets one
thread per `ELEMENTS_PER_THREAD` elements that one of its ops touches, and never more threads than
torch has. GPUs are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ELEMENTS_PER_THREAD = 1 << 19  # 2 MiB of fp32 per thread per op: below it, a barrier costs more than it saves


def loop_threads(elements_per_op: int, available: int) -> int:
    """Threads for a loop whose ops each touch `elements_per_op` elements: 1 to `available`."""
    return max(1, min(available, elements_per_op // ELEMENTS_PER_THREAD))


@contextmanager
def solver_threads(device: torch.device, elements_per_op: int) -> Iterator[int]:
    """On the CPU, run the block with `loop_threads(...)` intra-op threads, then restore the count."""
    if device.type != "cpu":
        yield 0
        return
    before = torch.get_num_threads()
    threads = loop_threads(elements_per_op, before)
    if threads == before:
        yield threads
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
