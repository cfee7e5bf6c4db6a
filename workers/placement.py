"""Placing stages on Ray: connect to a cluster, submit a stage with the resources its recipe asks for.

Resources go through `.options(num_cpus=..., num_gpus=..., memory=...)` at call time. A stage that
asks for GPUs on a cluster that has none runs on CPU instead, and the returned `Placement` says so,
so the orchestrator can record the degradation rather than hide it. Ray retries system failures (a
dead worker); an exception raised by the stage itself is not retried and reaches the caller.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import ray

from pipelines.recipe import Resources
from workers import local_ray, progress
from workers.progress import ProgressSink
from workers.requests import StageOutcome, StageRequest

log = logging.getLogger(__name__)

SYSTEM_RETRIES = 2
_connect_lock = threading.Lock()


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            bind_host: str = "127.0.0.1") -> dict:
    """Join the cluster at `address` (the caller's settings), else start a local one. Idempotent.

    A local node listens on `bind_host` only when that is a loopback address (Ray binds either loopback or
    every interface; `workers.local_ray` says why and checks it).
    """
    with _connect_lock:  # concurrent jobs of one process must not each start a Ray
        if not ray.is_initialized():
            if address:
                local_ray.connect_address(address)
            else:
                local_ray.start(bind_host, num_cpus=num_cpus, num_gpus=num_gpus)
    progress.mailbox()  # its actor starts while the caller prepares the first stage
    resources = ray.cluster_resources()
    log.info("ray cluster resources: %s", resources)
    return resources


def _run_on_worker(request: StageRequest, box: Any | None, num_cpus: float) -> StageOutcome:
    """The Ray task body: use the CPUs Ray granted, run the stage, note which GPUs Ray assigned."""
    import torch  # here, not at the top: the flow's process submits stages without loading the model stack

    from workers.runner import execute_stage

    torch.set_num_threads(max(1, int(num_cpus)))
    sink = ProgressSink(box, request.stage_run_id)
    sink.attempt()  # one per attempt: a second one means Ray re-ran the task after its worker died
    outcome = execute_stage(request, sink)
    outcome.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    return outcome


_remote_stage = ray.remote(max_retries=SYSTEM_RETRIES, retry_exceptions=False)(_run_on_worker)
# A GPU stage gets a worker process of its own, which exits after it. A Ray worker is reused by the job's
# next task, and Ray tells a task its GPUs through CUDA_VISIBLE_DEVICES, which CUDA reads once per process:
# a reused worker would run the next stage on the device of the first (possibly another job's GPU by now)
# and keep the first stage's cached GPU memory. Ray itself defaults to this only for functions declared
# with `num_gpus`; ours get their GPUs per call, through `.options`.
_remote_gpu_stage = ray.remote(max_retries=SYSTEM_RETRIES, retry_exceptions=False, max_calls=1)(_run_on_worker)
_FINAL_TAKE_S = 10.0


@dataclass
class Placement:
    """A submitted stage: its Ray reference, the mailbox its events go to and the resources it really got."""

    ref: ray.ObjectRef
    box: Any
    stage_run_id: str
    num_gpus: float
    note: str | None = None
    _taking: ray.ObjectRef | None = None

    def drain(self, final: bool = False) -> list[dict]:
        """This stage's events that reached the mailbox since the last call, without waiting for it; `final`
        (the stage has returned) waits, and takes everything the stage posted."""
        if self._taking is None:
            self._taking = self.box.take.remote(self.stage_run_id)
        if not final and not ray.wait([self._taking], timeout=0)[0]:
            return []  # the last take has not answered yet (e.g. the mailbox is still starting)
        try:
            events = ray.get(self._taking, timeout=_FINAL_TAKE_S if final else None)
            if final:  # the stage flushed before returning: a take sent now sees all it posted
                events += ray.get(self.box.take.remote(self.stage_run_id), timeout=_FINAL_TAKE_S)
        except (ray.exceptions.RayError, TimeoutError) as error:
            log.warning("progress of %s lost: %s", self.stage_run_id, error)
            events = []
        self._taking = None if final else self.box.take.remote(self.stage_run_id)
        return events


def _import_stage_stack() -> None:
    """The warm-up task's body: import what every stage's task imports first (`_run_on_worker`)."""
    import torch  # noqa: F401

    import workers.runner  # noqa: F401


_warm_up = ray.remote(num_cpus=0, max_retries=0)(_import_stage_stack)
_warming: list[ray.ObjectRef] = []  # the warm-up task in flight, until the first stage is submitted
_WARM_UP_WAIT_S = 10.0


def warm_up_worker() -> None:
    """Start a worker process of this Ray job that imports the stage stack, and return at once.

    A new Ray job (each `sparseflow run` is one) has no worker processes yet: its first stage would wait
    for one to start and import torch (1-2 s on 2 cores). Called where that can overlap other work (a run
    joining kept services does so before importing the flow), the worker can be idle by the first stage,
    which Ray then gives it (a 2-core machine busy with the run's own imports may not get there in time).
    Not called from the flow: right before a stage, Ray would start a second worker beside the busy one.
    The task asks for no CPU, so it never waits for or holds a stage's resources. The first stage waits
    for it (`submit`): while it is still importing, Ray would start another worker for the stage, which
    would import everything again beside it.
    """
    _warming[:] = [_warm_up.remote()]


def fit_resources(resources: Resources, cluster: dict[str, float]) -> tuple[dict[str, Any], str | None]:
    """Ray options for `resources` on this cluster, and a note for every request the cluster can never meet.

    Ray would keep an infeasible task pending forever, so a request beyond the whole cluster is cut to what
    the cluster has (GPUs to CPU when it has none) and the note says so; it is recorded on the stage run.
    """
    available = cluster.get("CPU", 1.0)
    options: dict[str, Any] = {"num_cpus": min(resources.num_cpus or available, available)}
    notes = []
    if resources.num_cpus and resources.num_cpus > available:
        notes.append(f"resources.num_cpus: asked for {resources.num_cpus:g}, the cluster has {available:g}: "
                     f"ran with {available:g}")
    gpus = cluster.get("GPU", 0.0)
    if resources.num_gpus > 0 and gpus <= 0:
        notes.append(f"resources.num_gpus: asked for {resources.num_gpus:g} GPU(s) but the cluster has none: "
                     "ran on CPU")
    elif resources.num_gpus > gpus:
        options["num_gpus"] = gpus
        notes.append(f"resources.num_gpus: asked for {resources.num_gpus:g}, the cluster has {gpus:g}: "
                     f"ran with {gpus:g}")
    elif resources.num_gpus > 0:
        options["num_gpus"] = resources.num_gpus
    if resources.memory_gb is not None:
        wanted, memory = int(resources.memory_gb * 1024**3), int(cluster.get("memory", 0))
        if memory and wanted > memory:
            notes.append(f"resources.memory_gb: asked for {resources.memory_gb:g} GB, the cluster has "
                         f"{memory / 1024**3:.1f} GB: ran without a memory reservation")
        else:
            options["memory"] = wanted
    return options, "; ".join(notes) or None


def submit(request: StageRequest, resources: Resources) -> Placement:
    """Start `request` on the cluster (which `connect` must have joined); its events go to the cluster's mailbox."""
    options, note = fit_resources(resources, ray.cluster_resources())
    if _warming:  # its worker is further along than a new one would be
        ray.wait(_warming, timeout=_WARM_UP_WAIT_S)
        _warming.clear()
    box = progress.mailbox()
    remote = _remote_gpu_stage if options.get("num_gpus") else _remote_stage
    ref = remote.options(name=f"stage:{request.label}", **options).remote(request, box, options["num_cpus"])
    return Placement(ref=ref, box=box, stage_run_id=request.stage_run_id, num_gpus=options.get("num_gpus", 0.0),
                     note=note)


def cancel(placement: Placement) -> None:
    """Stop a running stage (force-kills its worker process)."""
    ray.cancel(placement.ref, force=True)
