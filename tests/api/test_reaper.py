"""The service's child processes end with it, and a local Ray listens on loopback only.

`sparseflow serve` (embedded mode) runs a real tiny job, which starts a local Ray node (GCS, raylet,
agents, workers) and Prefect's ephemeral API server as descendants carrying the service's marker.
Killing the service (SIGKILL: no code of it runs; SIGTERM: it exits through Python) must leave none
of them behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from service_fixtures import tiny_recipe

from api.localcluster import free_port
from api.reaper import MARKER, marked_processes, still_running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc (Linux only)")

START_S = 240  # serve + a local Ray + Prefect's server on a busy 2-core machine
GONE_S = 40


def _service_env(home: Path) -> dict[str, str]:
    # nothing of this process's Prefect or Ray configuration: the service keeps its own under `home`
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARSEFLOW_", "PREFECT_", "RAY_")) and k != MARKER}
    env.update(SPARSEFLOW_HOME=str(home), SPARSEFLOW_RAY_NUM_CPUS="1", SPARSEFLOW_RAY_NUM_GPUS="0",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(START_S), PYTHONUNBUFFERED="1")
    return env


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _marker_of(processes: list[psutil.Process]) -> str | None:
    for process in processes:
        try:
            if MARKER in (env := process.environ()):
                return env[MARKER]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _commands(processes: list[psutil.Process]) -> list[str]:
    """Full command lines: a checkout's path can be long enough to push a module name far to the right."""
    out = []
    for process in processes:
        try:
            out.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            continue
    return out


def _names(processes: list[psutil.Process]) -> str:
    """Command lines shortened for a failure message."""
    return "; ".join(command[:160] for command in _commands(processes))


class Service:
    """A `sparseflow serve` subprocess that has started Ray and Prefect's server for a job."""

    def __init__(self, tmp_path: Path, model: Path, text: Path) -> None:
        self.log = tmp_path / "serve.log"
        port = free_port()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=_service_env(tmp_path / "home"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self.children: list[psutil.Process] = []
        self.instance: str | None = None
        self.job_id = ""
        self.recipe = tiny_recipe(model, text)
        self.recipe["stages"] = self.recipe["stages"][:2]  # calibrate, prune
        self.recipe["stages"][1]["resources"] = {}

    def start_job(self) -> None:
        """Submit a tiny job and wait until it has started Ray and Prefect's server."""
        self._wait(lambda: self._get("/healthz"), "the API to answer")
        response = httpx.post(f"{self.url}/v1/jobs", json={"recipe": self.recipe}, timeout=30)
        assert response.status_code == 201, response.text[:500]
        self.job_id = response.json()["id"]
        self._wait(self._started_ray_and_prefect, "Ray's GCS and raylet and Prefect's server to start")

    def _get(self, path: str) -> bool:
        try:
            return httpx.get(self.url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _started_ray_and_prefect(self) -> bool:
        self.children = _descendants(self.process.pid)
        commands = " ".join(_commands(self.children))
        self.instance = self.instance or _marker_of(self.children)
        if all(part in commands for part in ("gcs_server", "raylet", "prefect.server")):
            return True
        job = httpx.get(f"{self.url}/v1/jobs/{self.job_id}", timeout=10).json()
        assert job["status"] != "failed", f"the job failed before Ray started: {job.get('error')}\n" + \
            self._log_excerpt()
        return False

    def _wait(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self._log_excerpt()}"
            if done():
                return
            time.sleep(0.5)
        job = httpx.get(f"{self.url}/v1/jobs/{self.job_id}", timeout=10).json() if self.job_id else {}
        pytest.fail(f"timed out waiting for {what}; job {job.get('status')} (stages "
                    f"{[s.get('status') for s in job.get('stages', [])]}); children: {_names(self.children)}\n"
                    f"serve log:\n{self._log_excerpt()}")

    def _log_excerpt(self) -> str:
        """The serve log without uvicorn's access lines (this test's own polling)."""
        lines = [line for line in self.log.read_text().splitlines() if '"GET /' not in line]
        return "\n".join(lines)[-6000:]

    def marked(self) -> list[psutil.Process]:
        return marked_processes(self.instance) if self.instance else []

    def stop(self) -> None:
        """Teardown whatever happened: kill the service and anything it left."""
        self.children += _descendants(self.process.pid)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        for process in self.marked() + [p for p in self.children if p.is_running()]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue


@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path) -> Iterator[Service]:
    running = Service(tmp_path, tiny_model_dir, tiny_text_file)
    try:
        running.start_job()
        yield running
    finally:
        running.stop()


def _assert_all_gone(service: Service) -> None:
    assert service.instance, "the service's children should carry its marker"
    watched = [p for p in service.children if still_running(p)]
    deadline = time.monotonic() + GONE_S
    while time.monotonic() < deadline and (service.marked() or any(still_running(p) for p in watched)):
        time.sleep(0.5)
    left = service.marked() + [p for p in watched if still_running(p)]
    assert not left, f"still running {GONE_S} s after the service ended: {_names(left)}"


def test_sigkill_of_the_service_ends_ray_and_prefect(service: Service) -> None:
    assert len(service.marked()) >= 3  # GCS, raylet, Prefect's server at least
    os.kill(service.process.pid, signal.SIGKILL)
    assert service.process.wait(10) == -signal.SIGKILL
    _assert_all_gone(service)


def test_sigterm_exits_cleanly_and_ends_ray_and_prefect(service: Service) -> None:
    os.kill(service.process.pid, signal.SIGTERM)
    code = service.process.wait(60)
    assert code in (0, 128 + signal.SIGTERM), f"exit code {code}:\n{service.log.read_text()[-3000:]}"
    _assert_all_gone(service)


def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    script = """
import json, psutil, ray
from workers import placement
placement.connect(None, bind_host="127.0.0.1", num_cpus=1, num_gpus=0)
sockets = []
for process in psutil.Process().children(recursive=True) + [psutil.Process()]:
    try:
        for c in process.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                sockets.append([process.name(), c.laddr.ip, c.laddr.port])
    except psutil.NoSuchProcess:
        pass
print("SOCKETS", json.dumps(sockets))
ray.shutdown()
"""
    env = _service_env(tmp_path / "home")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=START_S)
    lines = [line for line in result.stdout.splitlines() if line.startswith("SOCKETS ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    sockets = json.loads(lines[0].removeprefix("SOCKETS "))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    exposed = [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
