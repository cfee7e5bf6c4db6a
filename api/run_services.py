"""The services an embedded `sparseflow run` needs, started side by side before the job, stopped after it.

A job's flow needs Prefect's API and, for its first stage, a Ray node. Started by the flow as it gets to
them, they come one after the other on the job's critical path: Prefect's ephemeral server (imported
into this process, then started as a child and waited for), then the local Ray node. Here both start as
the CLI's first act: Prefect's server as a child process (`api.prefect_server`) and the Ray node from a
background thread, while this process goes on importing the flow and checking the recipe. The flow then
finds Prefect answering and Ray connected (`workers.placement.connect` is idempotent and waits for a
start in progress).

Only what embedded mode starts itself is started: with `SPARSEFLOW_RAY_ADDRESS` the flow joins that
cluster, and a `PREFECT_API_URL` set by the user, or cluster mode, leaves Prefect alone.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from api.prefect_server import PrefectServer

if TYPE_CHECKING:
    from orchestrator.settings import Settings

log = logging.getLogger(__name__)
DEFAULT_PREFECT_TIMEOUT_S = 180.0
SIGTERM_NOTICE = "SIGTERM handler is not set because current thread is not the main thread"


class _DropSigtermNotice(logging.Filter):
    """`ray.init` outside the main thread says it leaves SIGTERM alone. The CLI has its own handler
    (`api.reaper.install_reaper`: SIGTERM leaves through Python, as Ray's would), so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(SIGTERM_NOTICE)


class RunServices:
    """`start_prefect()` first, `start_ray()` once the recipe is allowed, `ready()` before the job is
    recorded, `close()` after the summary."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefect: PrefectServer | None = None
        self._ray: threading.Thread | None = None
        self._stop = threading.Event()
        self.ray_error: Exception | None = None
        self.timings: dict[str, float] = {}
        self._began = time.monotonic()

    def start_prefect(self) -> RunServices:
        """Prefect's API server, when this run would otherwise have Prefect start an ephemeral one.

        Prefect reads its settings once, at import: in a process that imported it already (a program
        calling the CLI in-process) the server's address could not reach it, so Prefect keeps starting
        its own ephemeral server there, as it always did.
        """
        if self.settings.mode == "embedded" and not os.environ.get("PREFECT_API_URL") \
                and "prefect" not in sys.modules:
            self.prefect = PrefectServer().start()
        return self

    def start_ray(self) -> RunServices:
        """The local Ray node from a thread of its own, unless the job joins a cluster or this process is
        connected to a Ray already (then the flow uses that one and it is not this run's to stop)."""
        ray = sys.modules.get("ray")
        if not self.settings.ray_address and not (ray is not None and ray.is_initialized()):
            self._ray = threading.Thread(target=self._own_ray, name="ray-node", daemon=True)
            self._ray.start()
        return self

    def _own_ray(self) -> None:
        """Start the local node as the flow would, then keep this thread alive until `close` and stop the
        node from it. Ray starts its node's processes with a parent-death signal, which Linux sends when
        the starting *thread* ends: a thread that returned after `ray.init` would take the node with it.

        A failed start is only logged: the flow's own `connect` starts the node again and reports it.
        """
        ray_worker_log = logging.getLogger("ray._private.worker")
        if not any(isinstance(f, _DropSigtermNotice) for f in ray_worker_log.filters):
            ray_worker_log.addFilter(_DropSigtermNotice())
        try:
            from workers import placement

            settings = self.settings
            placement.connect(None, num_cpus=settings.ray_num_cpus, num_gpus=settings.ray_num_gpus,
                              bind_host=settings.ray_bind_host)
            self.timings["ray_ready_s"] = time.monotonic() - self._began
        except Exception as error:
            self.ray_error = error
            log.warning("the local Ray node did not start ahead of the job: %s", error)
        self._stop.wait()
        from api.reaper import shutdown_ray

        shutdown_ray()

    def ready(self) -> None:
        """Wait for Prefect's API (raises `PrefectServerError` naming why it is not up)."""
        if self.prefect is not None:
            timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                           DEFAULT_PREFECT_TIMEOUT_S))
            self.prefect.wait_ready(timeout)
            self.timings["prefect_ready_s"] = time.monotonic() - self._began

    def close(self, *, wait: bool = True) -> None:
        """Stop Prefect's server and the local Ray node at the same time (each takes a moment). Without
        `wait`, Prefect's server is only told to stop: for a process about to exit, whose reaper ends
        whatever is left."""
        stopper = None
        if self.prefect is not None:
            stopper = threading.Thread(target=self.prefect.stop, kwargs={"wait": wait}, name="prefect-stop")
            stopper.start()
        if self._ray is not None:
            self._stop.set()
            self._ray.join()
        if stopper is not None:
            stopper.join()
