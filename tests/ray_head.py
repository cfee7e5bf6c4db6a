"""A Ray head started the way a user starts one (`ray start --head --block`, loopback), for tests and benches.

It runs in a process group of its own, so `stop` ends the head and everything it started; its output
goes to `<folder>/ray-head.log`, which `start` reads to know when the node is up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from api.localcluster import free_port

START_S = 180


def token_auth(folder: Path) -> dict[str, str]:
    """Token authentication with a token of its own, written to `<folder>/token`: the environment a head and
    its clients need, as a cluster has them (not the ~/.ray/auth_token every local node would share)."""
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def start(folder: Path, cpus: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The head's process and its address (127.0.0.1:port) once Ray says it started; `env` adds to ours."""
    port = free_port()
    log = folder / "ray-head.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address",
             "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard=false",
             "--disable-usage-stats"],
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            stop(head)
            raise RuntimeError(f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return head, f"127.0.0.1:{port}"


def stop(head: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the head's process group (`ray start --block` stops its node on it), SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
