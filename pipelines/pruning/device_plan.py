"""Which device does what when one prune stage runs on several: sample shards, the solve plan, the devices.

Pure planning, no tensors moved: `multi_device.py` runs the plan. The plan is deterministic, so one
set of inputs always gives the same assignment (and tests can state it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shard_bounds(samples: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) sample ranges, one per device, sizes differing by at most one."""
    if parts < 1:
        raise ValueError(f"devices: need at least one device, got {parts}")
    base, extra = divmod(samples, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (1 if part < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def stage_devices(num_gpus: float, device: torch.device) -> list[torch.device]:
    """The devices a prune stage uses: `device` first, then the other visible GPUs, up to the
    `resources.num_gpus` it asked for (under Ray the visible GPUs are the ones it was given).
    One device unless `device` is a GPU and more than one was asked for."""
    device = torch.device(device)
    if device.type != "cuda" or num_gpus <= 1:
        return [device]
    first = device.index if device.index is not None else torch.cuda.current_device()
    others = [torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != first]
    return [torch.device("cuda", first), *others][: max(1, int(num_gpus))]


def solve_cost(rows: int, columns: int) -> float:
    """Rough cost of one solve of `rows` output rows sharing an input of `columns`: the factorization
    of the columns x columns Hessian (paid once per device that solves part of the group) plus the
    column updates, which grow with the rows."""
    return float(columns) ** 3 + float(rows) * float(columns) ** 2


@dataclass(frozen=True)
class Solve:
    """One call of `on_layer`: the Linears `names` (one shared-input group or a consecutive part of
    it, statistics under `leader`) pruned on device number `device`."""

    device: int
    leader: str
    names: tuple[str, ...]


def _lpt(units: list[tuple[str, tuple[str, ...], float]], parts: int) -> tuple[list[tuple[Solve, float]], list[float]]:
    """Longest first onto the least loaded device (ties: lowest index); the solves with their costs, and
    the load of each device."""
    load = [0.0] * parts
    solves = []
    for leader, names, cost in sorted(units, key=lambda u: (-u[2], u[1])):
        device = min(range(parts), key=lambda d: (load[d], d))
        load[device] += cost
        solves.append((Solve(device, leader, names), cost))
    return solves, load


def plan_solves(groups: list[list[str]], rows: dict[str, int], columns: dict[str, int], parts: int) -> list[Solve]:
    """Spread a step's independent solves over `parts` devices (see the module doc).

    `groups` are the shared-input groups of the step (statistics under `group[0]`), `rows[name]` the
    output rows of each Linear and `columns[leader]` the group's input width. Starts from whole
    groups; then, while the most loaded device holds a group of several Linears, tries splitting the
    largest such group in two at the Linear boundary that balances its rows best, and keeps the split
    if the step gets shorter. Deterministic: the same inputs give the same plan.
    """
    def unit(leader: str, names: tuple[str, ...]) -> tuple[str, tuple[str, ...], float]:
        return leader, names, solve_cost(sum(rows[n] for n in names), columns[leader])

    units = [unit(group[0], tuple(group)) for group in groups]
    solves, load = _lpt(units, parts)
    while parts > 1:
        busiest = max(range(parts), key=lambda d: (load[d], -d))
        splittable = [(s, c) for s, c in solves if s.device == busiest and len(s.names) > 1]
        if not splittable:
            break
        solve = max(splittable, key=lambda sc: sc[1])[0]
        names, total = solve.names, sum(rows[n] for n in solve.names)
        cut = min(range(1, len(names)), key=lambda k: (abs(2 * sum(rows[n] for n in names[:k]) - total), k))
        trial = [u for u in units if u[1] != names] + [unit(solve.leader, names[:cut]), unit(solve.leader, names[cut:])]
        trial_solves, trial_load = _lpt(trial, parts)
        if max(trial_load) >= max(load):
            break
        units, solves, load = trial, trial_solves, trial_load
    order = {name: i for i, name in enumerate(name for group in groups for name in group)}
    return sorted((s for s, _ in solves), key=lambda s: (s.device, order[s.names[0]]))
