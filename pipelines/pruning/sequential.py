"""The one layer-sequential driver: every method and the OWL pass run through `run_sequential`.

1. Capture: the decoder stack is swapped for recorders and the base model runs on the calibration
   token ids, so the embeddings, rotary tables and attention masks are computed by the model's own
   code. Recorder 0 keeps the hidden states (on the CPU); each recorder keeps the arguments its
   layer would have received (on the device; they are shared by all layers).
2. For each decoder layer: move it to the device, run every batch through it with forward
   pre-hooks on its targeted Linears accumulating input statistics (one `InputStats` per distinct
   input tensor, so q/k/v share one and gate/up share one), call `on_layer`, then run the batches
   again so the next layer sees the outputs of the modified layer (`propagate="pruned"`), or keep
   the outputs of the first run (`propagate="dense"`). Move the layer back and free its statistics.
   With `within_layer=True`, `on_layer` gets one group at a time in call order, and each later
   group's statistics are collected again after the groups before it were modified, so o_proj
   sees the outputs of the pruned q/k/v and down_proj those of the pruned gate/up (the "true
   sequential" order of GPTQ). That costs one more forward of the layer per group, truncated
   right after the group's input is recorded.

Only the current layer, its statistics and one batch of activations live on the device; the
activations of all samples stay in (pinned) CPU memory. The only host syncs are one per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipelines.modeling import decoder_layers
from pipelines.pruning.replay import SubmoduleReplay
from pipelines.pruning.stats import InputStats, accumulate
from pipelines.stage import ProgressFn, StageError

logger = logging.getLogger(__name__)


class CalibrationError(StageError, ValueError):
    """Calibration data that cannot drive the pruning (empty, wrong shape, or a Linear never reached)."""


@dataclass
class LayerWork:
    """What `on_layer` gets: one decoder layer (on the device) and the statistics of its inputs.

    `groups` lists the targeted Linears that received the same input tensor, in call order; the
    statistics of a group are stored under its first name (`stats[group[0]]`).
    """

    index: int
    layer: nn.Module
    linears: dict[str, nn.Linear]
    groups: list[list[str]]
    stats: dict[str, InputStats]


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Capture:
    calls: list[list[_Call]] = field(default_factory=list)  # [layer][batch]


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during capture: records its arguments, passes x through."""

    def __init__(self, index: int, capture: _Capture, hidden_sink: Callable[[Tensor], None] | None, source: nn.Module):
        super().__init__()
        self.index, self._capture, self._hidden_sink = index, capture, hidden_sink
        if hasattr(source, "attention_type"):  # models with sliding-window layers pick masks by this
            self.attention_type = source.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._capture.calls[self.index].append(_Call(args, kwargs))
        if self._hidden_sink is not None:
            self._hidden_sink(hidden_states)
        return hidden_states


class _StopForward(Exception):
    """Raised by a collector hook to end a forward once the statistics it needs are recorded."""


class _Collector:
    """Forward pre-hooks that accumulate input statistics once per distinct input tensor.

    With `stop_after` set, the hook of that Linear ends the forward (after recording) by raising
    `_StopForward`, which `_forward_all` catches: the rest of the layer would compute nothing needed.
    With `first_group_only`, every group is discovered but only the first one's statistics are kept
    (the within-layer order measures the others again after the groups before them are pruned).
    With `stop_early` (the caller keeps no output of this pass), the first batch runs as far as
    without it (the whole layer, or to `stop_after`) to discover the groups, and every later batch
    stops at the first Linear of the last group whose statistics are kept: that Linear's hook records
    the input the whole group shares. Under `within_layer` that skips most of the first pass, and a
    group's Linears after its first in each re-measuring pass. It is off when a Linear is called more
    than once per forward (the first call would end the batch).
    """

    def __init__(self, linears: dict[str, nn.Linear], full: bool, device: torch.device, stop_after: str | None = None,
                 first_group_only: bool = False, stop_early: bool = False):
        self.linears, self.full, self.device, self.stop_after = linears, full, device, stop_after
        self.first_group_only, self.stop_early = first_group_only, stop_early
        self._calls: list[str] = []  # hook calls of the first batch, in order
        self.groups: list[list[str]] = []
        self.stats: dict[str, InputStats] = {}
        self._leader: dict[str, str] = {}
        self._seen: dict[int, tuple[Tensor, str]] = {}  # id -> (tensor kept alive, leader) within one batch
        self._handles: list[Any] = []

    def __enter__(self) -> _Collector:
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def end_batch(self) -> None:
        self._seen.clear()
        if self.stop_early and self._calls:
            if len(set(self._calls)) == len(self._calls) and set(self._calls) == set(self.linears):
                self.stop_after = [group[0] for group in self.groups if group[0] in self.stats][-1]
            self.stop_early = False  # decided once, on the first batch

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self.stop_early:
                self._calls.append(name)
            leader = self._leader.get(name)
            if leader is None:  # first batch: group Linears that receive the very same tensor
                seen = self._seen.get(id(x))
                if seen is not None and seen[0] is x:
                    leader = self._leader[name] = seen[1]
                    next(g for g in self.groups if g[0] == leader).append(name)
                else:
                    leader = self._leader[name] = name
                    self.groups.append([name])
                    if not self.first_group_only or len(self.groups) == 1:
                        self.stats[name] = InputStats.empty(x.shape[-1], self.device, self.full)
                    self._seen[id(x)] = (x, name)
            if leader == name and name in self.stats:
                accumulate(self.stats[name], x.detach())
            if name == self.stop_after:
                raise _StopForward

        return hook

    def check_complete(self, index: int) -> None:
        missing = sorted(set(self.linears) - set(self._leader))
        if missing:
            raise CalibrationError(f"calibration: {missing[0]} (decoder layer {index}) received no input")


def _batches(samples: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]


def _first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _capture(
    model: nn.Module, prefix: str, layers: nn.ModuleList, input_ids: Tensor, batches: list[slice],
    device: torch.device, hidden: Tensor,
) -> _Capture:
    parent_name, _, attr = prefix.rpartition(".")
    base = model.get_submodule(parent_name) if parent_name else model
    capture = _Capture(calls=[[] for _ in layers])
    cursor = {"batch": 0}

    def keep_hidden(states: Tensor) -> None:
        hidden[batches[cursor["batch"]]].copy_(states, non_blocking=True)

    recorders = nn.ModuleList(
        _Recorder(i, capture, keep_hidden if i == 0 else None, layer) for i, layer in enumerate(layers)
    )
    home = next(base.parameters()).device
    setattr(base, attr, recorders)
    try:
        base.to(device)
        for b, rows in enumerate(batches):
            cursor["batch"] = b
            base(input_ids=input_ids[rows].to(device), use_cache=False)
    finally:
        base.to(home)
        setattr(base, attr, layers)
    return capture


@torch.no_grad()
def _forward_all(
    layer: nn.Module, calls: list[_Call], inputs: Tensor, outputs: Tensor | None, batches: list[slice],
    device: torch.device, collector: _Collector | None = None, replay: SubmoduleReplay | None = None,
) -> None:
    """Every batch through one layer; outputs (if given) written into the CPU buffer. With `replay`,
    finished children of the layer are recorded or replayed (`replay.py`). No grad here whatever the
    calling thread's mode (the multi-device driver calls this from worker threads): a graph would be
    chained onto the output buffer by the copy and keep every batch's activations alive."""
    with replay.active(len(batches)) if replay is not None else nullcontext():
        for b, rows in enumerate(batches):
            if replay is not None:
                replay.batch = b
            x = inputs[rows].to(device, non_blocking=True)
            try:
                out = _first_tensor(layer(x, *calls[b].args, **calls[b].kwargs))
            except _StopForward:
                out = None
            if collector is not None:
                collector.end_batch()
            if outputs is not None and out is not None:
                outputs[rows].copy_(out, non_blocking=True)


def run_sequential(
    model: nn.Module,
    input_ids: Tensor,
    targets: dict[int, dict[str, nn.Linear]],
    on_layer: Callable[[LayerWork], None],
    *,
    device: torch.device | None = None,
    devices: Sequence[torch.device] | None = None,
    batch_size: int = 4,
    full_stats: bool = True,
    propagate: Literal["pruned", "dense"] = "pruned",
    within_layer: bool = False,
    replay: bool | None = None,
    progress: ProgressFn | None = None,
    activations: Literal["host", "device"] = "host",
) -> int:
    """Run the calibration tokens through the decoder layer by layer, calling `on_layer` on each
    layer that has targeted Linears. Returns the peak device memory allocated (0 on the CPU).

    `full_stats=False` keeps only per-column sums of squares (enough for Wanda and OWL).
    `within_layer=True` calls `on_layer` once per shared-input group (see the module doc).
    `replay` reuses the outputs of a layer's finished children in its later passes (`replay.py`);
    None: on the CPU only, where memory for the records is plentiful.
    `devices` (instead of `device`): with more than one, `multi_device.run_multi_device` splits the
    samples and spreads the solves over them (`on_layer` is then called per solve, see its doc), with
    `activations` on the host or the devices; one device is this function's own path.
    """
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise CalibrationError(f"calibration: input_ids must be a non-empty [samples, seq_len] tensor, got "
                               f"shape {tuple(input_ids.shape)}")
    if devices is not None:
        devices = [torch.device(d) for d in devices]
        if not devices or (device is not None and torch.device(device).type != devices[0].type):
            raise ValueError(f"devices: need a non-empty list starting with a {device} device, got {devices}")
        if len(devices) > 1:
            from pipelines.pruning.multi_device import run_multi_device  # it builds on this module

            return run_multi_device(model, input_ids, targets, on_layer, devices=devices, batch_size=batch_size,
                                    full_stats=full_stats, propagate=propagate, within_layer=within_layer,
                                    replay=replay, progress=progress, activations=activations)
        device = devices[0]
    if device is None:
        raise ValueError("device: run_sequential needs device or devices")
    device = torch.device(device)
    prefix, layers = decoder_layers(model)
    homes: dict[int, torch.device] = {}

    def load(index: int, layer: nn.Module) -> None:
        homes[index] = next(layer.parameters()).device
        layer.to(device)

    def unload(index: int, layer: nn.Module) -> None:
        layer.to(homes.pop(index))

    return run_layers(model, prefix, layers, next(layers[0].parameters()).dtype, input_ids, targets, on_layer,
                      device=device, batch_size=batch_size, full_stats=full_stats, propagate=propagate,
                      within_layer=within_layer, replay=replay, progress=progress, load=load, unload=unload)


def run_layers(
    model: nn.Module,
    prefix: str,
    layers: Sequence[nn.Module],
    dtype: torch.dtype,
    input_ids: Tensor,
    targets: dict[int, dict[str, nn.Linear]],
    on_layer: Callable[[LayerWork], None],
    *,
    device: torch.device,
    batch_size: int,
    full_stats: bool,
    propagate: Literal["pruned", "dense"],
    within_layer: bool,
    replay: bool | None,
    progress: ProgressFn | None,
    load: Callable[[int, nn.Module], None],
    unload: Callable[[int, nn.Module], None],
    label: str = "",
) -> int:
    """The layer loop of `run_sequential` and `streaming.run_streaming` (see those for the arguments): they
    differ only in where a decoder layer's weights are while it is not worked on. `load(index, layer)` puts
    them on `device` before the layer's work, `unload(index, layer)` takes them away after it (in memory:
    back where they were; streamed: written to the layer's shard and freed). Returns the peak device memory."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batches = _batches(input_ids.shape[0], batch_size)
    shape = (input_ids.shape[0], input_ids.shape[1], model.config.hidden_size)
    inputs = torch.empty(shape, dtype=dtype, pin_memory=on_cuda)
    outputs = torch.empty(shape, dtype=dtype, pin_memory=on_cuda)

    with torch.no_grad():
        capture = _capture(model, prefix, layers, input_ids, batches, device, inputs)
        for index, layer in enumerate(layers):
            load(index, layer)
            linears = targets.get(index, {})
            last = index == len(layers) - 1

            calls = capture.calls[index]
            if linears:
                keep = outputs if propagate == "dense" and not last else None
                with _Collector(linears, full_stats, device, first_group_only=within_layer,
                                stop_early=keep is None) as collector:
                    _forward_all(layer, calls, inputs, keep, batches, device, collector)
                collector.check_complete(index)
                replaying = within_layer and (not on_cuda if replay is None else replay)
                replayer = SubmoduleReplay(layer, f"{prefix}.{index}", linears, enabled=replaying)
                if within_layer:
                    _groups_in_order(index, layer, linears, collector, calls, inputs, batches, device, on_layer,
                                     replayer)
                else:
                    on_layer(LayerWork(index, layer, linears, collector.groups, collector.stats))
                del collector
                if propagate == "pruned" and not last:
                    _forward_all(layer, calls, inputs, outputs, batches, device, replay=replayer)
                replayer.clear()
            elif not last:
                _forward_all(layer, calls, inputs, outputs, batches, device)
            if on_cuda:
                torch.cuda.synchronize(device)
            unload(index, layer)
            inputs, outputs = outputs, inputs
            if progress is not None:
                progress(index + 1, len(layers), f"decoder layer {index + 1}/{len(layers)}{label}")
    return int(torch.cuda.max_memory_allocated(device)) if on_cuda else 0


def _groups_in_order(
    index: int, layer: nn.Module, linears: dict[str, nn.Linear], first: _Collector, calls: list[_Call],
    inputs: Tensor, batches: list[slice], device: torch.device, on_layer: Callable[[LayerWork], None],
    replay: SubmoduleReplay,
) -> None:
    """`on_layer` on each group in call order; groups after the first are re-measured after the
    groups before them were modified (one forward each, stopped once the group has its input;
    after the first batch, at the group's first Linear, whose statistics the group shares)."""
    replay.set_groups(first.groups)
    for g, group in enumerate(first.groups):
        members = {name: linears[name] for name in group}
        if g == 0:
            stats = first.stats[group[0]]
        else:
            with _Collector(members, first.full, device, stop_after=group[-1], stop_early=True) as again:
                _forward_all(layer, calls, inputs, None, batches, device, again, replay=replay)
            again.check_complete(index)
            stats = again.stats[group[0]]
        on_layer(LayerWork(index, layer, members, [list(group)], {group[0]: stats}))
        replay.mark_pruned(group)
