"""Pruning one decoder layer: Linears that share an input are pruned together in one call.

Every method selects masks per output row, so the rows of q/k/v (or gate/up) can be stacked into
one weight and pruned with one Hessian factorization and one column loop; the result is split
back per Linear. Metrics come back as tensors and are moved to the CPU once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipelines.masks import pack_mask
from pipelines.pruning.magnitude import prune_magnitude
from pipelines.pruning.result import PruneResult
from pipelines.pruning.sequential import LayerWork
from pipelines.pruning.sparsegpt import prune_sparsegpt
from pipelines.pruning.stats import InputStats, relative_output_errors
from pipelines.pruning.threads import solver_threads
from pipelines.pruning.wanda import prune_wanda

Method = Literal["magnitude", "wanda", "sparsegpt"]
Statistics = Literal["none", "column_norms", "hessian"]


@dataclass(frozen=True)
class MethodConfig:
    """How to prune: the method and its knobs (a plain mirror of the recipe's prune spec)."""

    method: Method
    nm: tuple[int, int] | None = None
    block_size: int = 128
    dampening: float = 0.01
    retries: int = 4
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: unknown pruning method {self.method!r}; known: {', '.join(METHODS)}")

    @property
    def statistics(self) -> Statistics:
        """What the method needs of each Linear's inputs (`METHODS`)."""
        return METHODS[self.method].statistics

    @property
    def needs_data(self) -> bool:
        return self.statistics != "none"

    @property
    def needs_hessian(self) -> bool:
        return self.statistics == "hessian"


PruneFn = Callable[[Tensor, InputStats | None, MethodConfig, float], PruneResult]


def _magnitude(weight: Tensor, stats: InputStats | None, config: MethodConfig, sparsity: float) -> PruneResult:
    return prune_magnitude(weight, sparsity, config.nm)


def _wanda(weight: Tensor, stats: InputStats | None, config: MethodConfig, sparsity: float) -> PruneResult:
    return prune_wanda(weight, _require(stats, config).col_sq_norms, sparsity, config.nm)


def _sparsegpt(weight: Tensor, stats: InputStats | None, config: MethodConfig, sparsity: float) -> PruneResult:
    with solver_threads(weight.device, weight.shape[0] * config.block_size):  # a column update's size
        return prune_sparsegpt(
            weight, _require(stats, config).hessian(), sparsity, config.nm, config.block_size, config.dampening,
            config.retries, config.act_order,
        )


def _require(stats: InputStats | None, config: MethodConfig) -> InputStats:
    if stats is None:
        raise ValueError(f"method {config.method!r} needs calibration statistics")
    return stats


@dataclass(frozen=True)
class MethodEntry:
    """One pruning method: its pure function (adapted to one signature) and the input statistics it reads."""

    prune: PruneFn
    statistics: Statistics


METHODS: dict[str, MethodEntry] = {
    "magnitude": MethodEntry(_magnitude, "none"),
    "wanda": MethodEntry(_wanda, "column_norms"),
    "sparsegpt": MethodEntry(_sparsegpt, "hessian"),
}
"""Method name -> how to prune; the recipe's `method` values are exactly these keys."""


@dataclass
class LinearOutcome:
    """One pruned Linear: packed keep-mask on the CPU, and its metrics."""

    name: str
    shape: tuple[int, int]
    packed_mask: Tensor
    sparsity: float
    recon_error: float | None
    time_s: float
    damping: float | None
    target_sparsity: float


def prune_weight(weight: Tensor, stats: InputStats | None, config: MethodConfig, sparsity: float) -> PruneResult:
    """Prune one (row-stacked) weight with the method's pure function."""
    return METHODS[config.method].prune(weight, stats, config, sparsity)


class _Clock:
    """Elapsed time per interval; CUDA events on a GPU so timing adds no host sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: object, end: object) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]
        return float(end) - float(start)  # type: ignore[arg-type]


@torch.no_grad()
def prune_group(
    linears: list[tuple[str, nn.Linear]], stats: InputStats | None, config: MethodConfig, sparsity: float
) -> tuple[PruneResult, Tensor | None]:
    """Prune Linears that share one input as one row-stacked weight; write the weights back.

    Returns the stacked result and the per-Linear relative output errors (None without x xᵀ).
    """
    weights = [linear.weight for _, linear in linears]
    stacked = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
    result = prune_weight(stacked, stats, config, sparsity)
    rows = [w.shape[0] for w in weights]
    errors = None
    if stats is not None and stats.xtx is not None:
        errors = relative_output_errors(stacked, result.weight, stats.xtx, rows)
    for (_, linear), part in zip(linears, result.weight.split(rows), strict=True):
        linear.weight.copy_(part)
    return result, errors


def prune_layer(work: LayerWork, config: MethodConfig, sparsity: float) -> list[LinearOutcome]:
    """Prune every targeted Linear of one decoder layer at `sparsity`, group by group."""
    device = next(work.layer.parameters()).device
    clock = _Clock(device)
    pending = []
    for group in work.groups:
        members = [(name, work.linears[name]) for name in group]
        start = clock.start()
        result, errors = prune_group(members, work.stats[group[0]], config, sparsity)
        end = clock.start()
        pending.append((members, result, errors, start, end))
    return _collect(pending, clock, sparsity)


def prune_layer_without_data(linears: dict[str, nn.Linear], config: MethodConfig, sparsity: float) -> list[
    LinearOutcome
]:
    """Magnitude pruning without calibration data: each Linear on its own, no output error."""
    if config.needs_data:
        raise ValueError(f"method {config.method!r} needs calibration data")
    device = next(iter(linears.values())).weight.device
    clock = _Clock(device)
    pending = []
    for name, linear in linears.items():
        start = clock.start()
        result, errors = prune_group([(name, linear)], None, config, sparsity)
        pending.append(([(name, linear)], result, errors, start, clock.start()))
    return _collect(pending, clock, sparsity)


def _collect(pending: list, clock: _Clock, sparsity: float) -> list[LinearOutcome]:
    """Move masks and metrics to the CPU (one sync) and split group times by rows."""
    outcomes = []
    for members, result, errors, start, end in pending:
        rows = [linear.weight.shape[0] for _, linear in members]
        masks = [pack_mask(m).cpu() for m in result.mask.split(rows)]
        zeros = torch.stack([(linear.weight == 0).float().mean() for _, linear in members]).cpu().tolist()
        errs = errors.cpu().tolist() if errors is not None else [None] * len(members)
        if clock.cuda:
            torch.cuda.synchronize()
        seconds = clock.seconds(start, end)
        total_rows = sum(rows)
        for (name, linear), packed, zero, err, n_rows in zip(members, masks, zeros, errs, rows, strict=True):
            outcomes.append(
                LinearOutcome(
                    name=name,
                    shape=tuple(linear.weight.shape),
                    packed_mask=packed,
                    sparsity=zero,
                    recon_error=err,
                    time_s=seconds * n_rows / total_rows,
                    damping=result.damping,
                    target_sparsity=sparsity,
                )
            )
    return outcomes
