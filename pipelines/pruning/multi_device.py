"""The layer-sequential driver on several devices of one process: samples split, solves spread.

`run_sequential(..., devices=[d0, d1, ...])` comes here when there is more than one device. It does
what the one-device driver does (`sequential.py`), with three changes:

- Samples: the calibration samples are split into one contiguous shard per device
  (`device_plan.shard_bounds`).
  Each device captures its shard's layer-0 inputs with the model's own embedding code and keeps the
  shard for the whole run: a layer's outputs on a device are the next layer's inputs on the same
  device, so activations never move between devices. `activations="host"` keeps each shard in
  pinned host memory, copied batch by batch over that device's own link, as the one-device driver
  does (the memory per GPU stays that of one GPU); `"device"` keeps it on the device (no host copies,
  2 x shard bytes more per device).
- Statistics: every device holds a copy of the current layer (made from the first device's copy,
  a peer copy) and runs its shard through it with the statistics hooks. A group's sums (x xᵀ or
  column sums of squares, and token counts) are then added up in device order on the device that
  solves the group, and copied to the others that solve part of it.
- Solves: the independent solves of a step (all shared-input groups of the layer, or one group at a
  time under `within_layer`) are spread by `plan_solves`: longest first onto the least loaded
  device, by an estimate of their cost, and a group is split between devices at Linear boundaries
  (q | k,v; gate | up) when that shortens the step. Every method prunes row by row, so a split group
  gives the same masks as the whole. Each device runs its solves in its own thread (torch releases
  the GIL inside kernels); the pruned weights are then copied into every other device's copy before
  the next pass. On the CPU (a list like [cpu, cpu], for tests) the same plan runs in one thread.

Contract for `on_layer`: it is called once per planned solve, with a `LayerWork` whose `layer` and
`linears` are one device's copy and whose `groups` are `[[names]]`, possibly only some of a group's
Linears; calls for different CUDA devices run concurrently in different threads, each with its
device current. So a callback that needs a whole layer at once (the OWL outlier pass) runs on one
device. Results equal one device's up to floating-point order: the sums are added in another order
and the batches of a GEMM have other shapes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipelines.modeling import decoder_layers
from pipelines.pruning.device_plan import Solve, plan_solves, shard_bounds
from pipelines.pruning.replay import SubmoduleReplay
from pipelines.pruning.sequential import (
    CalibrationError,
    LayerWork,
    _batches,
    _Call,
    _capture,
    _Collector,
    _forward_all,
)
from pipelines.pruning.stats import InputStats
from pipelines.stage import ProgressFn

logger = logging.getLogger(__name__)

Activations = Literal["host", "device"]


def replicate(layer: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `layer` with its parameters and buffers on `device`, copied straight from where they
    are (a GPU-to-GPU copy when `layer` is on another GPU, no host round trip)."""
    memo: dict[int, object] = {}
    for param in layer.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to(device, copy=True), requires_grad=param.requires_grad)
    for buffer in layer.buffers():
        memo[id(buffer)] = buffer.to(device, copy=True)
    return copy.deepcopy(layer, memo)


def reduce_stats(parts: Sequence[InputStats], device: torch.device) -> InputStats:
    """Sum of per-device statistics on `device`, added in list order (a peer copy per part). The
    parts are the caller's to give away: the first one is added into when it is on `device` already."""
    first = parts[0]
    xtx = first.xtx.to(device) if first.xtx is not None else None
    sq_sum = first.sq_sum.to(device)
    tokens = first.tokens
    for part in parts[1:]:
        if xtx is not None:
            xtx.add_(part.xtx.to(device))
        sq_sum.add_(part.sq_sum.to(device))
        tokens += part.tokens
    return InputStats(sq_sum=sq_sum, xtx=xtx, tokens=tokens)


def copy_stats(stats: InputStats, device: torch.device) -> InputStats:
    """The same statistics on another device (bit for bit)."""
    if stats.sq_sum.device == device:
        return stats
    xtx = stats.xtx.to(device) if stats.xtx is not None else None
    return InputStats(sq_sum=stats.sq_sum.to(device), xtx=xtx, tokens=stats.tokens)


def device_context(device: torch.device):
    """Make `device` current in this thread (CUDA); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def run_in_threads(devices: Sequence[torch.device], work: Callable[[int], object]) -> list[object]:
    """`work(i)` for every device index, one thread each with that device current and this thread's
    grad mode. Grad mode is thread-local and a new thread starts with it on: without carrying the
    caller's `no_grad` over, every layer forward in a worker thread records an autograd graph, and
    the copy of its output into the activation buffer chains that graph (every saved activation of
    the batch, on the GPU) onto the buffer, which the next layer reads: the graphs of every batch of
    every layer stay alive until the GPU runs out of memory."""
    grad = torch.is_grad_enabled()

    def call(i: int) -> object:
        with torch.set_grad_enabled(grad), device_context(devices[i]):
            return work(i)

    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="sparseflow-device") as pool:
        return list(pool.map(call, range(len(devices))))


def run_parallel(devices: Sequence[torch.device], work: Callable[[int], object], serial: bool = False) -> list[object]:
    """`work(i)` for every device index, one thread per CUDA device (`run_in_threads`); on the
    CPU (or with `serial`) in order in this thread (CPU ops already use every core, and one thread
    keeps tests exact)."""
    if serial or len(devices) == 1 or any(d.type != "cuda" for d in devices):
        out = []
        for i in range(len(devices)):
            with device_context(devices[i]):
                out.append(work(i))
        return out
    return run_in_threads(devices, work)


def make_replayers(copies: Sequence[nn.Module], layer_prefix: str, linears: Sequence[dict[str, nn.Linear]],
                   enabled: bool) -> list[SubmoduleReplay]:
    """One `SubmoduleReplay` per device copy of the layer."""
    return [SubmoduleReplay(c, layer_prefix, found, enabled=enabled) for c, found in zip(copies, linears, strict=True)]


def same_names(layer: nn.Module, copy_: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """The Linears of `copy_` that correspond to `linears` of `layer`, under the same full names."""
    relative = {id(module): name for name, module in layer.named_modules()}
    out = {}
    for full, linear in linears.items():
        found = copy_.get_submodule(relative[id(linear)])
        if not isinstance(found, nn.Linear):
            raise TypeError(f"{full}: the copy of the layer has no Linear there")
        out[full] = found
    return out


def broadcast_weights(solves: Sequence[Solve], linears: Sequence[dict[str, nn.Linear]]) -> None:
    """Copy each solved Linear's weight (and bias) from its solver's copy into every other copy."""
    for solve in solves:
        for name in solve.names:
            source = linears[solve.device][name]
            for d, found in enumerate(linears):
                if d != solve.device:
                    found[name].weight.copy_(source.weight)
                    if source.bias is not None:
                        found[name].bias.copy_(source.bias)


def empty_shards(bounds: list[tuple[int, int]], tail: tuple[int, int], dtype: torch.dtype,
                 devices: Sequence[torch.device], where: Activations) -> list[Tensor]:
    """One activation buffer per device for its samples: on the device, or pinned on the host."""
    if where not in ("host", "device"):
        raise ValueError(f"activations: expected 'host' or 'device', got {where!r}")
    out = []
    for (start, end), device in zip(bounds, devices, strict=True):
        shape = (end - start, *tail)
        if where == "device":
            out.append(torch.empty(shape, dtype=dtype, device=device))
        else:
            out.append(torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda"))
    return out


class _Phases:
    """Wall seconds per phase of a run (logged at the end), each phase ended by a sync of every GPU
    so that its time is the GPUs' and not only the time to queue the work."""

    def __init__(self, devices: Sequence[torch.device]):
        self.cuda = [d for d in devices if d.type == "cuda"]
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        for device in self.cuda:
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class _LayerRun:
    """One decoder layer's copies (one per device) and what each device runs through its copy."""

    index: int
    copies: list[nn.Module]
    calls: list[list[_Call]]
    batches: list[list[slice]]
    devices: list[torch.device]

    def measure(self, collectors: list[_Collector], inputs: list[Tensor], keep: list[Tensor] | None,
                replayers: list[SubmoduleReplay] | None = None) -> None:
        """Every device's shard through its copy with its collector's hooks (outputs kept if `keep`)."""
        def one(i: int) -> None:
            with collectors[i]:
                _forward_all(self.copies[i], self.calls[i], inputs[i], keep[i] if keep is not None else None,
                             self.batches[i], self.devices[i], collectors[i],
                             replay=replayers[i] if replayers is not None else None)
            collectors[i].check_complete(self.index)

        run_parallel(self.devices, one)

    def forward(self, inputs: list[Tensor], outputs: list[Tensor], replayers: list[SubmoduleReplay] | None) -> None:
        """Every device's shard through its copy into its output buffer."""
        run_parallel(self.devices, lambda i: _forward_all(
            self.copies[i], self.calls[i], inputs[i], outputs[i], self.batches[i], self.devices[i],
            replay=replayers[i] if replayers is not None else None))


def _solve_step(index: int, groups: list[list[str]], parts: dict[str, list[InputStats]],
                linears: list[dict[str, nn.Linear]], copies: list[nn.Module], devices: list[torch.device],
                on_layer: Callable[[LayerWork], None], serial: bool) -> None:
    """Plan, reduce the statistics onto the solvers, solve concurrently, copy the results everywhere.
    `serial`: solve one device after the other (the first layer: Triton kernels compile on first use,
    and compiling the same kernel in two threads at once is not safe)."""
    rows = {name: linears[0][name].weight.shape[0] for group in groups for name in group}
    columns = {group[0]: linears[0][group[0]].in_features for group in groups}
    solves = plan_solves(groups, rows, columns, len(devices))
    reduced: dict[tuple[str, int], InputStats] = {}
    for leader, per_device in parts.items():
        solvers = sorted({s.device for s in solves if s.leader == leader})
        total = reduce_stats(per_device, devices[solvers[0]])
        per_device.clear()  # the per-device sums are no longer needed
        for d in solvers:
            reduced[(leader, d)] = copy_stats(total, devices[d])
        del total

    def work(i: int) -> None:
        for solve in (s for s in solves if s.device == i):
            members = {name: linears[i][name] for name in solve.names}
            stats = {solve.names[0]: reduced[(solve.leader, i)]}
            on_layer(LayerWork(index, copies[i], members, [list(solve.names)], stats))

    run_parallel(devices, work, serial=serial)
    reduced.clear()
    broadcast_weights(solves, linears)


def run_multi_device(
    model: nn.Module,
    input_ids: Tensor,
    targets: dict[int, dict[str, nn.Linear]],
    on_layer: Callable[[LayerWork], None],
    *,
    devices: Sequence[torch.device],
    batch_size: int = 4,
    full_stats: bool = True,
    propagate: Literal["pruned", "dense"] = "pruned",
    within_layer: bool = False,
    replay: bool | None = None,
    progress: ProgressFn | None = None,
    activations: Activations = "host",
) -> int:
    """`run_sequential` over several devices (see the module doc); the arguments mean the same.
    Returns the largest peak memory allocated on any of the CUDA devices (0 on the CPU)."""
    devices = [torch.device(d) for d in devices]
    if len(devices) > input_ids.shape[0]:
        logger.warning("devices: %d calibration samples for %d devices; using the first %d",
                       input_ids.shape[0], len(devices), input_ids.shape[0])
        devices = devices[: input_ids.shape[0]]
    on_cuda = [d for d in devices if d.type == "cuda"]
    for device in on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    prefix, layers = decoder_layers(model)
    bounds = shard_bounds(input_ids.shape[0], len(devices))
    batches = [_batches(end - start, batch_size) for start, end in bounds]
    tail = (input_ids.shape[1], model.config.hidden_size)
    dtype = next(layers[0].parameters()).dtype
    inputs = empty_shards(bounds, tail, dtype, devices, activations)
    outputs = empty_shards(bounds, tail, dtype, devices, activations)
    every = range(len(devices))
    first_solved = min(targets, default=-1)
    logger.info("pruning on %d devices (%s), samples per device %s, activations on the %s",
                len(devices), ", ".join(map(str, devices)), [e - s for s, e in bounds], activations)

    phase = _Phases(devices)
    with torch.no_grad():
        with phase("capture"):
            captures = [_capture(model, prefix, layers, input_ids[s:e], batches[i], devices[i], inputs[i])
                        for i, (s, e) in enumerate(bounds)]
        for index, layer in enumerate(layers):
            home = next(layer.parameters()).device
            with phase("layer to devices"):
                layer.to(devices[0])
                copies = [layer] + [replicate(layer, d) for d in devices[1:]]
            run = _LayerRun(index, copies, [capture.calls[index] for capture in captures], batches, devices)
            del copies
            found = targets.get(index, {})
            last = index == len(layers) - 1
            if found:
                linears = [found] + [same_names(layer, c, found) for c in run.copies[1:]]
                keep = outputs if propagate == "dense" and not last else None
                first = [_Collector(linears[i], full_stats, devices[i], first_group_only=within_layer,
                                    stop_early=keep is None) for i in every]
                with phase("forward"):
                    run.measure(first, inputs, keep)
                groups = first[0].groups
                if any(c.groups != groups for c in first[1:]):
                    raise CalibrationError(f"calibration: decoder layer {index} grouped its Linears differently "
                                           "on different devices")
                replaying = within_layer and (not on_cuda if replay is None else replay)
                replayers = make_replayers(run.copies, f"{prefix}.{index}", linears, replaying)
                if within_layer:
                    for r in replayers:
                        r.set_groups(groups)
                    for g, group in enumerate(groups):
                        collectors = first if g == 0 else [
                            _Collector({n: linears[i][n] for n in group}, full_stats, devices[i],
                                       stop_after=group[-1], stop_early=True) for i in every]
                        if g > 0:
                            with phase("forward"):
                                run.measure(collectors, inputs, None, replayers)
                        parts = [c.stats.pop(group[0]) for c in collectors]
                        with phase("solve"):
                            _solve_step(index, [group], {group[0]: parts}, linears, run.copies, devices, on_layer,
                                        serial=index == first_solved)
                        for r in replayers:
                            r.mark_pruned(group)
                else:
                    parts = {group[0]: [c.stats.pop(group[0]) for c in first] for group in groups}
                    with phase("solve"):
                        _solve_step(index, groups, parts, linears, run.copies, devices, on_layer,
                                    serial=index == first_solved)
                del first
                if propagate == "pruned" and not last:
                    with phase("forward"):
                        run.forward(inputs, outputs, replayers)
                for r in replayers:
                    r.clear()
            elif not last:
                with phase("forward"):
                    run.forward(inputs, outputs, None)
            del run
            with phase("layer home"):
                layer.to(home)
            inputs, outputs = outputs, inputs
            if progress is not None:
                progress(index + 1, len(layers), f"decoder layer {index + 1}/{len(layers)}")
    logger.info("multi-device seconds by phase: %s", {k: round(v, 3) for k, v in phase.seconds.items()})
    return max((int(torch.cuda.max_memory_allocated(d)) for d in on_cuda), default=0)
