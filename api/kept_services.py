"""Prefect's API server and a local Ray node kept up between embedded runs, and stopped once idle.

An embedded `sparseflow run` needs both, and started per run they are most of what it costs beyond its
stages (on 2 cores: Prefect's server answers after about 4.3 s, a Ray node takes 4.5-5.7 s and its Python
helpers about 6.5 CPU s). As build tools keep a daemon between commands, the first run starts both in a
process of their own, the *keeper* (`api.keeper`), and later runs of the same home and environment join
them. The keeper stops both and exits once no run has used them for `SPARSEFLOW_KEEP_SERVICES_S` seconds
(default 600; 0 keeps nothing: each run starts and stops its own, as before). `sparseflow services`
shows the keeper; `sparseflow services --stop` stops it now.

Files, under <home>/services/:

    keeper.json  the keeper's pid and start time, its state (starting, ready, failed), Prefect's API
                 URL, the Ray address, and the fingerprint of the environment it was started for.
    keeper.lock  held exclusively while a run reads or changes keeper.json, and by the keeper while it
                 decides to retire: no run joins a keeper that is stopping.
    in-use       each run that joined holds a shared lock on it until it ends (a crashed run's lock ends
                 with its process); the keeper retires only when it can lock it exclusively.
    last-used    touched by runs as they join and leave; its age is the keeper's idle time.
    keeper.log   the keeper's output.

A keeper serves runs started in the environment it was started in: the interpreter, `sys.path`, the
working directory, the environment variables and the Ray node's size. Ray's workers inherit the keeper's
environment, not the run's, so a run in another environment must not use them: it replaces an idle
keeper, or, while another run uses that one, starts and stops its own services as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from api.prefect_server import PrefectServerError, free_port
from api.reaper import KEEPER_MARKER, MARKER

_POLL_S = 0.1
_REPLACE_WAIT_S = 15.0
# per-shell or per-terminal variables that Ray's workers never read; any other difference is a new keeper
_UNKEYED_ENV = {"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "TERM", "PS1", "LS_COLORS", "SSH_TTY",
                "SSH_CLIENT", "SSH_CONNECTION", MARKER, "PREFECT_API_URL", KEEPER_MARKER}
# the keeper's own launch: a short-lived process starts it in a session of its own and exits, so the
# keeper is no descendant of the run (whose reaper ends the run's descendants when it ends)
_LAUNCH = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, "
           "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")


class KeptServicesError(PrefectServerError):
    """The keeper failed to start its services (Prefect's server among them), or died; the message says
    why and where its log is."""


@dataclass
class KeeperState:
    """What keeper.json holds."""

    pid: int
    created: float  # the keeper process's start time: with the pid, it tells a reused pid from the keeper
    state: str  # starting | ready | failed
    prefect_api_url: str
    fingerprint: str
    idle_s: float
    ray_address: str | None = None
    error: str | None = None

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.created) < 1.0
        except psutil.Error:
            return False


class ServiceFiles:
    """The paths of one home's kept services, and keeper.json's reads and atomic writes."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "services"
        self.state = self.folder / "keeper.json"
        self.lock = self.folder / "keeper.lock"
        self.in_use = self.folder / "in-use"
        self.last_used = self.folder / "last-used"
        self.log = self.folder / "keeper.log"

    def read(self) -> KeeperState | None:
        try:
            return KeeperState(**json.loads(self.state.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, state: KeeperState) -> None:
        partial = self.state.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(asdict(state)))
        os.replace(partial, self.state)

    def touch(self) -> None:
        self.last_used.touch()

    def idle_s(self) -> float:
        try:
            return time.time() - self.last_used.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    @contextlib.contextmanager
    def locked(self) -> Any:
        """keeper.lock, exclusively, for a read-decide-write of keeper.json."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open_in_use(self) -> IO[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        return open(self.in_use, "a")


def fingerprint(num_cpus: int | None, num_gpus: int | None, bind_host: str) -> str:
    """What a keeper's services depend on beyond the home: see the module's docstring."""
    env = {key: value for key, value in os.environ.items() if key not in _UNKEYED_ENV}
    described = {"python": sys.executable, "path": sys.path, "cwd": os.getcwd(), "env": env,
                 "ray": [num_cpus, num_gpus, bind_host]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class Lease:
    """One run's use of a keeper: its Prefect URL at once, its Ray address once ready; `release` at the end."""

    def __init__(self, files: ServiceFiles, state: KeeperState, in_use: IO[str], *, started: bool) -> None:
        self.files = files
        self.state = state
        self.started = started  # this run started the keeper
        self._in_use: IO[str] | None = in_use

    @property
    def prefect_api_url(self) -> str:
        return self.state.prefect_api_url

    def wait_ready(self, timeout_s: float, cancel: threading.Event | None = None) -> KeeperState:
        """Block until the keeper says its services are up; raise `KeptServicesError` if it failed or died,
        or once `cancel` is set (the run ended first, e.g. its recipe was refused)."""
        began = time.monotonic()
        while True:
            if cancel is not None and cancel.is_set():
                raise KeptServicesError("the run ended before the kept services were up")
            found = self.files.read()
            if found is not None and found.pid == self.state.pid:
                self.state = found
                if found.state == "ready":
                    return found
                if found.state == "failed":
                    raise KeptServicesError(f"the services' keeper failed: {found.error} (log: {self.files.log})")
            if not self.state.alive():
                raise KeptServicesError(f"the services' keeper (pid {self.state.pid}) exited before its services "
                                        f"were up (log: {self.files.log})")
            if time.monotonic() - began > timeout_s:
                raise KeptServicesError(f"the services' keeper did not have Prefect and Ray up within {timeout_s:g} s "
                                        f"(log: {self.files.log})")
            time.sleep(_POLL_S)

    def release(self) -> None:
        """This run is done with the services: the keeper's idle time starts now."""
        if self._in_use is None:
            return
        self.files.touch()
        fcntl.flock(self._in_use, fcntl.LOCK_UN)
        self._in_use.close()
        self._in_use = None


def lease(home: Path, idle_s: float, *, num_cpus: int | None = None, num_gpus: int | None = None,
          bind_host: str = "127.0.0.1") -> Lease | None:
    """Join this home's keeper, or start one. None: a keeper of another environment is in use by another
    run, so this run starts its own services. Call it before importing Prefect (its address is read once).
    """
    files = ServiceFiles(home)
    wanted = fingerprint(num_cpus, num_gpus, bind_host)
    with files.locked():
        current = files.read()
        if current is not None and current.alive() and current.state != "failed":
            in_use = files.open_in_use()
            if current.fingerprint == wanted:
                fcntl.flock(in_use, fcntl.LOCK_SH)  # the keeper locks it only while holding keeper.lock
                files.touch()
                return Lease(files, current, in_use, started=False)
            try:
                fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another run uses it: leave it be
                in_use.close()
                return None
            stop_keeper(current)
            fcntl.flock(in_use, fcntl.LOCK_UN)
            in_use.close()
        state = _start_keeper(files, idle_s, wanted, num_cpus, num_gpus, bind_host)
        in_use = files.open_in_use()
        fcntl.flock(in_use, fcntl.LOCK_SH)
        files.touch()
        return Lease(files, state, in_use, started=True)


def _start_keeper(files: ServiceFiles, idle_s: float, wanted: str, num_cpus: int | None,
                  num_gpus: int | None, bind_host: str) -> KeeperState:
    port = free_port()
    command = [sys.executable, "-m", "api.keeper", "--home", str(files.folder.parent), "--port", str(port),
               "--idle-s", str(idle_s), "--bind-host", bind_host]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    env = {key: value for key, value in os.environ.items() if key != MARKER}  # not the run's: its own
    env[KEEPER_MARKER] = "1"
    launched = subprocess.run([sys.executable, "-c", _LAUNCH, *command], env=env, capture_output=True, text=True,
                              check=True, timeout=30)
    pid = int(launched.stdout.strip())
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        created = 0.0  # gone already: the run's wait_ready reports it, with the log
    state = KeeperState(pid=pid, created=created, state="starting", prefect_api_url=f"http://127.0.0.1:{port}/api",
                        fingerprint=wanted, idle_s=idle_s)
    files.write(state)
    return state


def stop_keeper(state: KeeperState, wait_s: float = _REPLACE_WAIT_S) -> bool:
    """SIGTERM the keeper (it stops Prefect and Ray, then exits) and wait for it; SIGKILL after `wait_s`
    (its reaper then ends what it started). False if it was not running."""
    if not state.alive():
        return False
    process = psutil.Process(state.pid)
    with contextlib.suppress(psutil.Error):
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(wait_s)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(wait_s)
    return True
