"""Timing GPU calls: CUDA events, warm-up, median of repeats, rotating inputs, device noted.

`time_calls(fn, n_inputs)` calls `fn(i)` for i cycling over `n_inputs` prepared input sets (so that
weights and activations are not all sitting in L2), records events around `inner` back-to-back calls
and reports per-call times: the median (what decisions use), the spread, and how many were taken.
Back-to-back calls include launch overhead when the host is slower than the GPU, as eager inference does.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    inner: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def copies_to_defeat_l2(bytes_per_input: int, device: torch.device, factor: float = 3.0, cap: int = 16) -> int:
    """How many distinct input sets make the rotation overflow L2 `factor` times over."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(cap, math.ceil(factor * l2 / max(bytes_per_input, 1))))


def time_calls(
    fn: Callable[[int], Any],
    n_inputs: int = 1,
    *,
    warmup: int = 5,
    repeats: int = 50,
    target_ms: float = 1.0,
    max_inner: int = 200,
) -> Timing:
    """Per-call time of `fn(i)`, i rotating over `n_inputs`, on the current CUDA stream."""
    for i in range(max(warmup, n_inputs)):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    # size the inner loop so one event pair spans about `target_ms`
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n_inputs):
        fn(i)
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / n_inputs, 1e-4)
    inner = max(1, min(max_inner, math.ceil(target_ms / one)))
    samples: list[float] = []
    call = 0
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn(call % n_inputs)
            call += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    samples.sort()
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return Timing(statistics.median(samples), q[0], q[-1], len(samples), inner)


def host_us_per_call(fn: Callable[[int], Any], n_inputs: int = 1, *, calls: int = 200, rounds: int = 5) -> float:
    """Median microseconds the host spends issuing one call of `fn(i)`, with no synchronization in the loop.

    Eager inference of a few tokens is paced by this rather than by GPU time: the GPU finishes each
    small op before the host has queued the next. `calls` stays well under the launch queue's depth,
    so the loop never waits for the GPU."""
    for i in range(max(3, n_inputs)):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for call in range(calls):
            fn(call % n_inputs)
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def capture_graph(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, output) of one captured call of `fn`, after `warmup` calls on a side stream (lazy state,
    allocations and per-device attributes settle there, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_graph_us(fn: Callable[[], Any], calls: int = 1, replays: int = 20) -> float:
    """Median microseconds per call of work that `fn` does in `calls` calls, replayed from a CUDA graph:
    GPU time with no host work in between (how servers run decode steps)."""
    graph, _ = capture_graph(fn)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def device_info(device: torch.device | None = None) -> dict[str, Any]:
    """GPU name, capability, SMs, memory, clocks (where NVML answers), and library versions."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": None,
    }
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return info
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    info.update(
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    )
    info.update(_nvml(device.index or 0))
    return info


def _nvml(index: int) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"clocks": "pynvml not installed"}
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            driver = pynvml.nvmlSystemGetDriverVersion()
            return {
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # noqa: BLE001 - NVML is informational only
        return {"clocks": f"NVML unavailable: {error}"}
