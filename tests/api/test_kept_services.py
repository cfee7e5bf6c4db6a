"""Kept services: embedded runs share one Prefect server and Ray node, held by a keeper that stops when idle.

Real processes throughout: `sparseflow run` as a user runs it, the keeper it starts, Prefect's server and
a Ray node. Checked: the first run starts the keeper and says so, and the keeper outlives the run (its
reaper spares it); a second run joins the same keeper (Prefect counts both flow runs) and says nothing;
a run in another environment replaces an idle keeper; `sparseflow services --stop` stops it, and an idle
keeper stops by itself, leaving none of its processes behind, as does a keeper killed with SIGKILL. Tests
elsewhere run with SPARSEFLOW_KEEP_SERVICES_S=0 (tests/conftest.py): every run starts and stops its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from api.kept_services import KeeperState, Lease, ServiceFiles, fingerprint, stop_keeper
from api.prefect_server import PrefectServerError

REPO = Path(__file__).resolve().parents[2]
KEPT_NOTE = "Prefect and Ray stay up for the next run"


def _cli(home: Path, *args: str, keep_s: float = 120, extra: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARSEFLOW_HOME": str(home), "SPARSEFLOW_KEEP_SERVICES_S": str(keep_s), **(extra or {})}
    for key in ("SPARSEFLOW_URL", "PREFECT_API_URL", "SPARSEFLOW_PREFECT_API_URL", "SPARSEFLOW_RAY_ADDRESS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "could not join" not in result.stdout + result.stderr  # no fallback to a Ray node of its own
    return result.stdout


def _flow_runs(api_url: str) -> int:
    request = urllib.request.Request(f"{api_url}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(json.loads(answer.read()))


def _ray_jobs(address: str) -> int:
    """How many drivers the keeper's Ray node has had (its own, then one per run that joined it)."""
    code = ("import ray, sys; from workers.local_ray import connect_address; connect_address(sys.argv[1]); "
            "print(len(ray.state.jobs()))")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    found = subprocess.run([sys.executable, "-c", code, address], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120, check=True)
    return int(found.stdout.strip().splitlines()[-1]) - 1  # this process's own job


def _tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def _all_ended(processes: list[psutil.Process], within_s: float) -> list[str]:
    _, alive = psutil.wait_procs(processes, timeout=within_s)
    return [f"{p.name()}[{p.pid}]" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: kept\nreuse_cached: false\nstages:\n  - stage: sleep\n    seconds: 0.5\n")
    return path


@pytest.fixture
def home(tmp_path: Path):
    home = tmp_path / "home"
    yield home
    state = ServiceFiles(home).read()  # whatever a failing test left: stopped, with its tree
    if state is not None and state.alive():
        tree = _tree(state.pid)
        stop_keeper(state)
        psutil.wait_procs(tree, timeout=30)


def test_runs_share_a_keeper_that_outlives_them_and_stops_on_request(home: Path, recipe: Path) -> None:
    files = ServiceFiles(home)
    first = _ok(_cli(home, "run", str(recipe)))
    assert KEPT_NOTE in first
    state = files.read()
    assert state is not None and state.state == "ready" and state.ray_address
    time.sleep(7)  # past the run's reaper's grace: it must have spared the keeper and its services
    assert state.alive()
    keeper_tree = _tree(state.pid)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in keeper_tree)  # Prefect's server
    assert any(p.name().startswith("raylet") for p in keeper_tree)
    assert _flow_runs(state.prefect_api_url) == 1
    assert _ray_jobs(state.ray_address) == 2  # the keeper's own driver and the run's

    second = _ok(_cli(home, "run", str(recipe)))
    assert KEPT_NOTE not in second  # joined, did not start
    assert files.read() == state
    assert _flow_runs(state.prefect_api_url) == 2  # the same Prefect server ran both flows
    assert _ray_jobs(state.ray_address) == 4  # the same Ray node ran both (and the first probe's job)

    shown = _ok(_cli(home, "services"))
    assert f"keeper pid {state.pid}: ready" in shown and state.prefect_api_url in shown
    assert "stopped" in _ok(_cli(home, "services", "--stop"))
    assert not _all_ended(keeper_tree, 30)
    assert files.read() is None
    assert "no services kept up" in _ok(_cli(home, "services"))


def test_keepers_are_replaced_stop_when_idle_and_leave_nothing_when_killed(home: Path, recipe: Path) -> None:
    files = ServiceFiles(home)
    _ok(_cli(home, "run", str(recipe), keep_s=60))
    before = files.read()
    assert before is not None
    old_tree = _tree(before.pid)
    replaced = _ok(_cli(home, "run", str(recipe), keep_s=4, extra={"SPARSEFLOW_TEST_OTHER_ENV": "1"}))
    assert KEPT_NOTE in replaced
    assert not _all_ended(old_tree, 30)  # the keeper of the other environment stopped, with its services
    after = files.read()
    assert after is not None and after.pid != before.pid and after.fingerprint != before.fingerprint
    new_tree = _tree(after.pid)
    assert not _all_ended(new_tree, 60)  # unused for 4 s: it stops by itself
    assert files.read() is None

    _ok(_cli(home, "run", str(recipe), keep_s=60))
    killed = files.read()
    assert killed is not None
    killed_tree = _tree(killed.pid)
    killed_tree[0].kill()  # SIGKILL: no code of the keeper runs; its reaper ends what it started
    assert not _all_ended(killed_tree, 30)


def test_fingerprint_follows_the_environment_workers_inherit(monkeypatch: pytest.MonkeyPatch) -> None:
    base = fingerprint(None, None, "127.0.0.1")
    assert fingerprint(None, None, "127.0.0.1") == base
    monkeypatch.setenv("COLUMNS", "99")  # a terminal's width: not something a worker reads
    assert fingerprint(None, None, "127.0.0.1") == base
    assert fingerprint(2, None, "127.0.0.1") != base
    monkeypatch.setenv("HF_HOME", "/elsewhere")
    assert fingerprint(None, None, "127.0.0.1") != base


def test_a_lease_reports_a_keeper_that_failed_or_died(tmp_path: Path) -> None:
    files = ServiceFiles(tmp_path)
    files.folder.mkdir(parents=True)
    me = psutil.Process()
    failed = KeeperState(pid=me.pid, created=me.create_time(), state="failed", prefect_api_url="http://x/api",
                         fingerprint="f", idle_s=1, error="RuntimeError: port taken")
    files.write(failed)
    with pytest.raises(PrefectServerError, match="port taken"):
        Lease(files, failed, files.open_in_use(), started=True).wait_ready(5)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = KeeperState(pid=gone.pid, created=time.time() - 5, state="starting", prefect_api_url="http://x/api",
                       fingerprint="f", idle_s=1)
    files.write(dead)
    with pytest.raises(PrefectServerError, match="exited before its services were up"):
        Lease(files, dead, files.open_in_use(), started=True).wait_ready(5)
