"""Sleep: a stand-in stage that holds its resources for a set time, for measuring orchestration and capacity.

Benchmarks of the service itself (per-stage overhead, how many jobs share a Ray cluster's GPUs, how long a
nightly zoo takes) need stages whose own duration is known exactly and costs no CPU. This one does nothing
but wait: the Ray task that runs it keeps the resources its recipe asked for (e.g. `num_gpus: 1` of a
cluster's logical GPUs) for `seconds`, reports progress every `_TICK_S`, and writes a small JSON marker
(kind `marker`) saying when and where it ran, so a benchmark can check from the artifacts alone which
stages overlapped. It loads no model and reads no data. Recipe sample::

    - stage: sleep
      seconds: 20
      resources: {num_gpus: 1, num_cpus: 0.5}
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import UTC, datetime

from pipelines.recipe import SleepStage
from pipelines.stage import Metric, StageContext, StageResult

MARKER_FILE = "marker.json"
_TICK_S = 0.5


def _now() -> str:
    return datetime.now(UTC).isoformat()


def run(spec: SleepStage, ctx: StageContext) -> StageResult:
    ticks = max(1, math.ceil(spec.seconds / _TICK_S))
    started_at, started = _now(), time.monotonic()
    deadline = started + spec.seconds
    ctx.progress(0, ticks, f"sleeping {spec.seconds:g} s")
    for tick in range(1, ticks + 1):
        # sleep to a deadline per tick, not a fixed step, so the total does not drift with the ticks
        time.sleep(max(0.0, min(started + tick * _TICK_S, deadline) - time.monotonic()))
        ctx.progress(tick, ticks, f"slept {min(tick * _TICK_S, spec.seconds):g} of {spec.seconds:g} s")
    slept = time.monotonic() - started
    marker = {
        "stage": "sleep",
        "seconds": spec.seconds,
        "slept_seconds": slept,
        "started_at": started_at,
        "finished_at": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(ctx.device),
        # set by Ray to the GPUs it granted the task (logical ones included); absent outside Ray
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "resources": spec.resources.model_dump(mode="json"),
    }
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    out = ctx.workdir / MARKER_FILE
    out.write_text(json.dumps(marker, indent=2))
    return StageResult(
        outputs={"marker": out},
        metrics=[Metric("slept_seconds", slept)],
        summary={"seconds": spec.seconds, "slept_seconds": slept},
    )
