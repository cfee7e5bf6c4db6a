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

With `keep` (the CLI's `run` and `resume`) and `SPARSEFLOW_KEEP_SERVICES_S` above 0, both come from the
home's keeper instead (`api.kept_services`): the first such run starts it, later ones join what it keeps
up, and none of them stops it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from api import kept_services
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

    def __init__(self, settings: Settings, *, keep: bool = False) -> None:
        self.settings = settings
        self.keep = keep
        self.prefect: PrefectServer | None = None
        self.lease: kept_services.Lease | None = None
        self._ray_joined = threading.Event()
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
            self.lease = self._kept()
            if self.lease is not None:
                os.environ["PREFECT_API_URL"] = self.lease.prefect_api_url
                # the keeper's node was started in this environment: without a mode set, with Ray's default
                # for a new local node, token authentication, which a joining process must be told of
                os.environ.setdefault("RAY_AUTH_MODE", "token")
                # joining starts nothing, so it need not wait for the recipe's checks: the sooner this run's
                # first Ray worker starts, the sooner it is warm. Joining a keeper that is up takes about
                # 0.6 s, mostly importing Ray (which the flow needs anyway): done here, the worker's start
                # overlaps all of this process's imports; a keeper still starting is joined by a thread.
                if self.lease.state.state == "ready":
                    self._join_kept()
                else:
                    self._ray = threading.Thread(target=self._join_kept, name="ray-join", daemon=True)
                    self._ray.start()
            else:
                self.prefect = PrefectServer().start()
        return self

    def _kept(self) -> kept_services.Lease | None:
        """The home's kept services, when this run may use them (its Ray node too: none joined or given)."""
        settings = self.settings
        ray = sys.modules.get("ray")
        if not self.keep or settings.keep_services_s <= 0 or settings.ray_address \
                or (ray is not None and ray.is_initialized()):
            return None
        return kept_services.lease(settings.home, settings.keep_services_s, num_cpus=settings.ray_num_cpus,
                                   num_gpus=settings.ray_num_gpus, bind_host=settings.ray_bind_host)

    def start_ray(self) -> RunServices:
        """The local Ray node from a thread of its own, unless the job joins a cluster or this process is
        connected to a Ray already (then the flow uses that one and it is not this run's to stop)."""
        ray = sys.modules.get("ray")
        if self.lease is not None:
            return self  # joining since `start_prefect`
        if not self.settings.ray_address and not (ray is not None and ray.is_initialized()):
            self._ray = threading.Thread(target=self._own_ray, name="ray-node", daemon=True)
            self._ray.start()
        return self

    def _join_kept(self) -> None:
        """Join the keeper's Ray node once it is up and start this run's first worker. A failure is only
        noted: `ready` reports a keeper that failed, and the flow's own `connect` starts a local node
        otherwise. The connection needs no thread to hold it (it starts no processes); `close` ends it."""
        assert self.lease is not None
        try:
            state = self.lease.wait_ready(self._timeout_s(), cancel=self._stop)
            from workers import placement

            placement.connect(state.ray_address)
            placement.warm_up_worker()
            self.timings["ray_ready_s"] = time.monotonic() - self._began
        except Exception as error:
            self.ray_error = error
            if not self._stop.is_set():  # else the run ended first: nothing to say
                log.warning("could not join the kept Ray node: %s", error)
        finally:
            self._ray_joined.set()

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

    @staticmethod
    def _timeout_s() -> float:
        return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", DEFAULT_PREFECT_TIMEOUT_S))

    def ready(self) -> None:
        """Wait for Prefect's API (raises `PrefectServerError` naming why it is not up) and, for kept
        services, for this run to have joined their Ray node (else the flow would start one of its own)."""
        if self.prefect is not None:
            self.prefect.wait_ready(self._timeout_s())
            self.timings["prefect_ready_s"] = time.monotonic() - self._began
        if self.lease is not None:
            self.lease.wait_ready(self._timeout_s())
            self.timings["prefect_ready_s"] = time.monotonic() - self._began
            self._ray_joined.wait()

    def kept_note(self) -> str | None:
        """One line for the summary when this run started the keeper: what stays up, and how to stop it."""
        if self.lease is None or not self.lease.started:
            return None
        minutes = self.settings.keep_services_s / 60
        return (f"Prefect and Ray stay up for the next run until unused for {minutes:g} min "
                "(`sparseflow services --stop` stops them; SPARSEFLOW_KEEP_SERVICES_S=0 keeps nothing)")

    def close(self, *, wait: bool = True) -> None:
        """Stop Prefect's server and the local Ray node at the same time (each takes a moment); kept
        services are only left (this run's Ray connection closed, its lease released). Without `wait`,
        Prefect's server is only told to stop: for a process about to exit, whose reaper ends whatever is
        left."""
        stopper = None
        if self.prefect is not None:
            stopper = threading.Thread(target=self.prefect.stop, kwargs={"wait": wait}, name="prefect-stop")
            stopper.start()
        if self._ray is not None:
            self._stop.set()
            self._ray.join()
        if self.lease is not None:
            from api.reaper import shutdown_ray

            shutdown_ray()  # this run's connection only: the node is the keeper's
            self.lease.release()
        if stopper is not None:
            stopper.join()
