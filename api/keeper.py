"""The keeper: one process that holds Prefect's API server and a local Ray node for embedded runs.

Started by the first run that needs them (`api.kept_services.lease`), in a session of its own. It starts
both side by side, records in keeper.json that they are up, and then waits: every second it checks how
long no run has used them, and past its idle time it retires (under keeper.lock, and only if no run holds
the in-use lock), stopping both. SIGTERM (`sparseflow services --stop`, or a run that needs another
environment) stops both at once. Its reaper ends what it started if it is killed.

    python -m api.keeper --home ~/.sparseflow --port 4200 --idle-s 600
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import signal
import sys
import time
from pathlib import Path

import psutil

from api.kept_services import KeeperState, ServiceFiles
from api.prefect_server import PrefectServer
from api.reaper import install_reaper

log = logging.getLogger("sparseflow.keeper")
_CHECK_S = 1.0
_PREFECT_START_S = 300.0  # the first start creates Prefect's database: minutes on a busy 2-core machine


class Keeper:
    def __init__(self, files: ServiceFiles, idle_s: float) -> None:
        self.files = files
        self.idle_s = idle_s
        me = psutil.Process()
        self.pid, self.created = me.pid, me.create_time()
        self.prefect: PrefectServer | None = None

    def _state(self) -> KeeperState | None:
        """keeper.json if it is still this keeper's (a run replaces it only once this keeper is gone)."""
        found = self.files.read()
        return found if found is not None and found.pid == self.pid else None

    def start(self, port: int, num_cpus: int | None, num_gpus: int | None, bind_host: str) -> None:
        """Prefect's server (a child) and the Ray node (in this process) side by side; then say so."""
        self.prefect = PrefectServer().start(port)
        from workers import placement

        placement.connect(None, num_cpus=num_cpus, num_gpus=num_gpus, bind_host=bind_host)
        self.prefect.wait_ready(_PREFECT_START_S)
        import ray

        state = self._state()
        if state is None:
            raise RuntimeError("keeper.json no longer names this keeper")
        state.state, state.ray_address = "ready", ray.get_runtime_context().gcs_address
        self.files.write(state)
        log.info("ready: Prefect %s, Ray %s; stopping after %g s unused", state.prefect_api_url,
                 state.ray_address, self.idle_s)

    def fail(self, error: BaseException) -> None:
        state = self._state()
        if state is not None:
            state.state, state.error = "failed", f"{type(error).__name__}: {error}"
            self.files.write(state)

    def wait_idle(self) -> None:
        """Return once the services have been unused for `idle_s` and keeper.json no longer names them."""
        while True:
            time.sleep(_CHECK_S)
            if self._state() is None:  # replaced or removed: nobody will join these services again
                return
            if self.files.idle_s() < self.idle_s:
                continue
            with self.files.locked(), self.files.open_in_use() as in_use:
                try:
                    fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a run is using them (its lease ends with a touch)
                    continue
                if self.files.idle_s() >= self.idle_s and self._state() is not None:
                    self.files.state.unlink()
                    return

    def stop(self, *, forget: bool = True) -> None:
        """Stop Prefect's server and the Ray node; with `forget`, remove keeper.json if it still names this
        keeper (a failed keeper leaves it, saying why, for the run waiting on it)."""
        if forget and self._state() is not None:
            self.files.state.unlink(missing_ok=True)
        if self.prefect is not None:
            self.prefect.stop()
        from api.reaper import shutdown_ray

        shutdown_ray()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Keep Prefect's API server and a Ray node up for embedded runs.")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="Prefect's API port (the run chose it).")
    parser.add_argument("--idle-s", type=float, required=True, help="Stop after this long unused.")
    parser.add_argument("--bind-host", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--num-gpus", type=int)
    args = parser.parse_args(argv)
    files = ServiceFiles(args.home)
    files.folder.mkdir(parents=True, exist_ok=True)
    log_file = open(files.log, "a", buffering=1)  # noqa: SIM115 (the process's output for its whole life)
    sys.stdout = sys.stderr = log_file
    logging.basicConfig(level=logging.INFO, stream=log_file, format="%(asctime)s keeper: %(message)s")
    install_reaper()  # what it starts ends with it, even if it is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keeper = Keeper(files, args.idle_s)
    failed = False
    try:
        keeper.start(args.port, args.num_cpus, args.num_gpus, args.bind_host)
        keeper.wait_idle()
        log.info("unused for %g s: stopping", args.idle_s)
    except SystemExit:
        log.info("told to stop")
    except BaseException as error:
        log.exception("failed")
        keeper.fail(error)
        failed = True
    finally:
        keeper.stop(forget=not failed)


if __name__ == "__main__":
    main()
