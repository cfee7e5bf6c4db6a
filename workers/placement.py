"""Placing stages on Ray: connect to a cluster, submit a stage with the resources its recipe asks for.

Resources go through `.options(num_cpus=..., num_gpus=..., memory=...)` at call time. A stage that
asks for GPUs on a cluster that has none runs on CPU instead, and the returned `Placement` says so,
so the orchestrator can record the degradation rather than hide it. Ray retries system failures (a
dead worker); an exception raised by the stage itself is not retried and reaches the caller.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.queue import Queue

from pipelines.recipe import Resources
from workers.progress import ProgressSink
from workers.runner import StageOutcome, StageRequest, execute_stage

log = logging.getLogger(__name__)

SYSTEM_RETRIES = 2


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Join the cluster at `address` (or `SPARSEFLOW_RAY_ADDRESS`), else start a local one. Idempotent."""
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("SPARSEFLOW_RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    resources = ray.cluster_resources()
    log.info("ray cluster resources: %s", resources)
    return resources


def _run_on_worker(request: StageRequest, queue: Any | None, num_cpus: float) -> StageOutcome:
    """The Ray task body: use the CPUs Ray granted, run the stage, note which GPUs Ray assigned."""
    torch.set_num_threads(max(1, int(num_cpus)))
    outcome = execute_stage(request, ProgressSink(queue, request.stage_run_id))
    outcome.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    return outcome


_remote_stage = ray.remote(max_retries=SYSTEM_RETRIES, retry_exceptions=False)(_run_on_worker)


@dataclass
class Placement:
    """A submitted stage: its Ray reference, its progress queue and the resources it really got."""

    ref: ray.ObjectRef
    queue: Queue
    num_gpus: float
    note: str | None = None

    def drain(self) -> list[dict]:
        """Progress events that arrived since the last call."""
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


def fit_resources(resources: Resources, cluster: dict[str, float]) -> tuple[dict[str, Any], str | None]:
    """Ray options for `resources` on this cluster, and a note when a GPU request had to fall back to CPU."""
    available = cluster.get("CPU", 1.0)
    options: dict[str, Any] = {"num_cpus": min(resources.num_cpus or available, available)}
    note = None
    if resources.num_gpus > 0 and cluster.get("GPU", 0.0) <= 0:
        note = f"asked for {resources.num_gpus:g} GPU(s) but the cluster has none: ran on CPU"
    elif resources.num_gpus > 0:
        options["num_gpus"] = resources.num_gpus
    if resources.memory_gb is not None:
        options["memory"] = int(resources.memory_gb * 1024**3)
    return options, note


def submit(request: StageRequest, resources: Resources) -> Placement:
    """Start `request` on the cluster (which `connect` must have joined)."""
    options, note = fit_resources(resources, ray.cluster_resources())
    queue = Queue(actor_options={"num_cpus": 0})
    ref = _remote_stage.options(name=f"stage:{request.label}", **options).remote(request, queue, options["num_cpus"])
    return Placement(ref=ref, queue=queue, num_gpus=options.get("num_gpus", 0.0), note=note)


def cancel(placement: Placement) -> None:
    """Stop a running stage (force-kills its worker process)."""
    ray.cancel(placement.ref, force=True)
