"""Prefect's API for one `sparseflow run`, started before anything else so that it is up by the flow.

Without `PREFECT_API_URL`, Prefect starts an ephemeral API server the first time a flow needs one: it
imports its whole server package into the calling process (seconds of CPU, only to build a command
line) and then starts the same package again as a child process and waits for it, all on the job's
critical path. `PrefectServer` starts that same child (uvicorn serving `prefect.server.api.server:create_app`
with the UI off and the server's ephemeral and final flags, as Prefect's `SubprocessASGIServer` does) as
the CLI's first act, without importing Prefect here, and points `PREFECT_API_URL` at it; the child's
start then overlaps the CLI's own imports and the local Ray node's start. Its database is the usual one
under `PREFECT_HOME`. It ends with the run (`stop`, and the reaper after a crash).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from threading import Thread

log = logging.getLogger(__name__)

_POLL_S = 0.1
_STOP_WAIT_S = 5.0


class PrefectServerError(RuntimeError):
    """Prefect's API server did not come up; the message carries its last output."""


def free_port() -> int:
    """A loopback TCP port free now (a race with other programs remains: the server's start reports it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrefectServer:
    """One Prefect API server child process on a free loopback port."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._output: deque[str] = deque(maxlen=40)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, port: int | None = None) -> PrefectServer:
        """Start the child on `port` (default: a free one) and set `PREFECT_API_URL` for this process
        (Prefect must not be imported yet)."""
        if "prefect" in sys.modules:
            raise PrefectServerError("start Prefect's server before importing prefect: its settings are read once")
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        Thread(target=self._keep_output, args=(self.process,), name="prefect-server-output", daemon=True).start()
        os.environ["PREFECT_API_URL"] = self.api_url
        return self

    def _keep_output(self, process: subprocess.Popen[bytes]) -> None:
        """Keep the last lines the server writes (for an error message); drained so it never blocks."""
        assert process.stdout is not None
        for line in process.stdout:
            self._output.append(line.decode(errors="replace").rstrip())

    def wait_ready(self, timeout_s: float) -> float:
        """Block until the server answers `/health`; returns the seconds waited. Raises `PrefectServerError`
        if it exits or misses `timeout_s`."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:  # uvicorn's 3: its port was taken meanwhile or the app's startup failed
                raise PrefectServerError(self._failure(f"exited with status {code}"))
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return time.monotonic() - began
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(_POLL_S)
        raise PrefectServerError(self._failure(f"did not answer within {timeout_s:g} s "
                                               "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"))

    def _failure(self, what: str) -> str:
        tail = "\n".join(self._output)
        return f"Prefect's API server {what}" + (f"; its last output:\n{tail}" if tail else "")

    def stop(self, *, wait: bool = True) -> None:
        """Terminate the server and, with `wait`, reap it (killed if it ignores SIGTERM for a few seconds)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        if not wait:
            return
        try:
            process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
