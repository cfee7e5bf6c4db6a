"""The service's child processes end with it, however it ends (SIGKILL included).

Ray (its GCS, raylet, agents and workers) and Prefect (its ephemeral API server) start processes of
their own. They live in other process groups, so once the service is gone nothing stops them: a
SIGKILLed `sparseflow serve` used to leave a Ray node and a Prefect server running, listening on ports.
After SIGKILL no code of the service runs, so the watcher has to be another process.

`install_reaper()` marks this service instance: it sets `SPARSEFLOW_SERVICE_INSTANCE=<uuid>` in
`os.environ` before Ray or Prefect start anything, so every descendant inherits the marker (a process
keeps the environment it was started with in /proc/<pid>/environ, whatever it does later). It then
starts `python -m api.reaper` in a session of its own. That reaper waits for the service's pid to end,
then terminates every process carrying the marker: SIGTERM, a grace period, SIGKILL. The marker is
internal, not a setting: nothing reads it from its own environment.

A process can hide its marker: Ray's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) set their
process title over the memory that /proc/<pid>/environ reads, and once their raylet is gone they are
orphans that nothing links to the service. So while it waits, the reaper also notes the service's
descendants every `_WATCH_S` seconds, and ends those still running (the same process: pid and start
time) along with the marked ones.

On SIGTERM the service exits through Python (atexit handlers run, so Ray and Prefect shut down
cleanly) rather than being killed by the default action. Linux only (it reads /proc); elsewhere
`install_reaper` logs that it does nothing.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import NoReturn

import psutil

log = logging.getLogger(__name__)

MARKER = "SPARSEFLOW_SERVICE_INSTANCE"
# started with this set, a process is the keeper of kept services (api.kept_services): a run that started
# it must not end it, though it was briefly the run's descendant
KEEPER_MARKER = "SPARSEFLOW_KEEPER"
GRACE_S = 5.0
_POLL_S = 0.5
_WATCH_S = 1.0  # how often the reaper notes the service's descendants
_installed: tuple[int, str] | None = None  # (pid, instance): install once per process


def marked_processes(instance: str, marker: str = MARKER) -> list[psutil.Process]:
    """Processes (of any user we may inspect) started with `marker=instance`, this one and its parents excluded."""
    me = psutil.Process()
    spared = {me.pid} | {parent.pid for parent in me.parents()}
    found = []
    for process in psutil.process_iter():
        if process.pid in spared:
            continue
        try:
            if process.environ().get(marker) == instance:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def terminate(processes: list[psutil.Process], grace_s: float = GRACE_S) -> list[str]:
    """SIGTERM `processes`, SIGKILL those still alive after `grace_s`; returns 'name[pid]' of each."""
    stopped = []
    for process in processes:
        try:
            stopped.append(f"{process.name()}[{process.pid}]")
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=grace_s)
    return stopped


def sweep(instance: str, marker: str = MARKER, grace_s: float = GRACE_S, rounds: int = 5,
          known: list[psutil.Process] | None = None) -> list[str]:
    """Terminate every marked process and every one of `known` still running; repeats while stopping some
    (a dying raylet may start others)."""
    stopped: list[str] = []
    for _ in range(rounds):
        found = marked_processes(instance, marker)
        seen = {process.pid for process in found}
        found += [p for p in known or [] if p.pid not in seen and still_running(p) and not _kept_by_other(p, instance)]
        if not found:
            break
        stopped += terminate(found, grace_s)
    return stopped


def _kept_by_other(process: psutil.Process, instance: str) -> bool:
    """A keeper, or a process its keeper started: not this instance's to end (unless this is that keeper's
    own reaper, whose instance the keeper's children carry)."""
    try:
        environ = process.environ()
    except psutil.Error:
        return False
    return KEEPER_MARKER in environ and environ.get(MARKER) != instance


def still_running(process: psutil.Process) -> bool:
    """The very process (psutil compares its start time, so a reused pid is not it), and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _note_descendants(pid: int, known: dict[int, psutil.Process]) -> None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            if child.pid != os.getpid():
                known.setdefault(child.pid, child)
    except psutil.Error:
        pass


def wait_for_exit(pid: int, known: dict[int, psutil.Process] | None = None) -> None:
    """Block until process `pid` (our parent when we started) has ended; meanwhile, with `known`, note its
    descendants in it every `_WATCH_S` seconds."""
    if os.getppid() != pid:  # reparented already: the service ended before we looked
        return
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # kernel without pidfd (< 5.3): poll
        while os.getppid() == pid:
            if known is not None:
                _note_descendants(pid, known)
            time.sleep(_POLL_S)
        return
    try:
        while True:
            if known is not None:
                _note_descendants(pid, known)
            if select.select([handle], [], [], _WATCH_S)[0]:  # a pidfd turns readable when its process ends
                return
    finally:
        os.close(handle)


def install_reaper(grace_s: float = GRACE_S) -> str | None:
    """Mark this service instance and start its reaper; returns the instance id (None off Linux).

    Call it early in a command that starts Ray or Prefect, before they start anything. Idempotent
    within a process.
    """
    global _installed
    if _installed and _installed[0] == os.getpid():
        return _installed[1]
    if not sys.platform.startswith("linux"):
        log.warning("child processes are not reaped on %s (Linux only): stop Ray and Prefect yourself "
                    "if this service is killed", sys.platform)
        return None
    instance = uuid.uuid4().hex
    env = {key: value for key, value in os.environ.items() if key != MARKER}
    subprocess.Popen(
        [sys.executable, "-m", "api.reaper", str(os.getpid()), instance, "--grace-s", str(grace_s)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    )
    os.environ[MARKER] = instance
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _installed = (os.getpid(), instance)
    log.info("reaper watches pid %d (instance %s)", os.getpid(), instance)
    return instance


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM leaves through Python, so atexit handlers (ray.shutdown, Prefect's server) run."""
    raise SystemExit(128 + signum)


def shutdown_ray() -> None:
    """Stop this process's Ray (the local node it started, or its connection), if it has one."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def exit_service(code: int) -> NoReturn:
    """Leave now: stop Ray, run the atexit handlers (Prefect's server among them), exit.

    Python would first wait for every non-daemon thread, and a job running in this process could take
    hours. It is not waited for: it stays `running` in the store, and the service's reconciler marks it
    interrupted (and resumes it, if its recipe allows) when the service starts again.
    """
    shutdown_ray()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stop a service instance's processes once it has ended.")
    parser.add_argument("pid", type=int, help="The service process to watch.")
    parser.add_argument("instance", help=f"The value of {MARKER} its descendants carry.")
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help="SIGTERM to SIGKILL delay.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="sparseflow reaper: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, psutil.Process] = {}
    wait_for_exit(args.pid, known)
    stopped = sweep(args.instance, grace_s=args.grace_s, known=list(known.values()))
    if stopped:
        log.info("service pid %d ended; stopped %d of its processes: %s", args.pid, len(stopped),
                 ", ".join(stopped))


if __name__ == "__main__":
    main()
