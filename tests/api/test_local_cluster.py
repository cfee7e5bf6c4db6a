"""`sparseflow up` starts every part of the distributed service on this machine, `sparseflow down` stops them.

One real cluster (PostgreSQL databases, moto's S3 server, a Prefect server, a Ray head, one worker, the API)
is started, each part is asked whether it answers, through the environment `up` hands to clients, and
then it is stopped: no recorded process and no process carrying the cluster's marker may remain.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from api.localcluster import CLUSTER_MARKER, ClusterState
from api.reaper import MARKER, marked_processes

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cluster is stopped via /proc")]

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
UP_S = 600  # every part on a busy 2-core machine; usually well under half of it
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _postgres() -> bool:
    import psycopg

    try:
        psycopg.connect(ADMIN_URL, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARSEFLOW_", "PREFECT_", "RAY_", "AWS_", "FSSPEC_")) and k not in (MARKER,)}
    env["SPARSEFLOW_HOME"] = str(home)
    return env


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _exports(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


def _drop(names: list[str]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Cluster:
    def __init__(self, home: Path, env: dict[str, str], env_file: Path, state: ClusterState) -> None:
        self.home, self.env, self.env_file, self.state = home, env, env_file, state
        self.exports = _exports(env_file)

    def client_env(self) -> dict[str, str]:
        return {**self.env, **self.exports}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not _postgres():
        pytest.skip(f"no PostgreSQL at {ADMIN_URL}")
    home = tmp_path_factory.mktemp("cluster") / "home"
    env = _base_env(home)
    suffix = uuid.uuid4().hex[:8]
    databases = [f"sf_test_{suffix}", f"prefect_test_{suffix}"]
    env_file = home.parent / "cluster.env"
    state = None
    try:
        up = _cli("up", "--workers", "1", "--cpus", "1", "--store-db", databases[0], "--prefect-db", databases[1],
                  "--env-file", str(env_file), "--timeout", "300", env=env, timeout=UP_S)
        state = ClusterState.load(home)
        assert up.returncode == 0, f"up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        for part in ("s3", "prefect", "ray", "deploy", "worker-1", "api"):
            assert f"{part} " in up.stdout, up.stdout
        yield Cluster(home, env, env_file, state)
    finally:
        _cli("down", env=env, timeout=180)
        if state is not None:  # whatever down missed, so that a failing test leaves nothing behind
            for process in marked_processes(state.instance, CLUSTER_MARKER):
                process.kill()
        _drop(databases)


def test_up_starts_every_part_and_each_answers(cluster: Cluster) -> None:
    exports = cluster.exports
    assert CLUSTER_MARKER not in exports, "a shell with the marker would have its own processes stopped by down"
    assert exports["SPARSEFLOW_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert exports["SPARSEFLOW_ARTIFACT_ROOT"].startswith("s3://")
    printed = _cli("up", "--print-env", env=cluster.env, timeout=120)
    assert printed.returncode == 0 and printed.stdout.splitlines() == cluster.env_file.read_text().splitlines()
    # Prefect: healthy, on PostgreSQL, with the deployment's pool and the worker registered
    prefect = exports["PREFECT_API_URL"]
    assert httpx.get(f"{prefect}/health", timeout=10).json() is True
    workers = httpx.post(f"{prefect}/work_pools/sparseflow/workers/filter", json={}, timeout=10).json()
    assert "local-worker-1" in {w["name"] for w in workers}
    deployments = httpx.post(f"{prefect}/deployments/filter", json={}, timeout=10).json()
    assert any(d["name"] == "compression-job" for d in deployments)
    # the API, in cluster mode
    assert httpx.get(f"{exports['SPARSEFLOW_URL']}/healthz", timeout=10).status_code == 200
    # Ray, reached the way workers reach it (address + token from the exported environment)
    status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address",
                             exports["SPARSEFLOW_RAY_ADDRESS"]], env=cluster.client_env(), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stderr[-2000:]
    # S3: write and read through fsspec with nothing but the exported environment
    probe = subprocess.run(
        [sys.executable, "-c", "import fsspec; fs = fsspec.filesystem('s3'); fs.pipe('sparseflow/probe.txt', b'ok');"
         " print(fs.cat('sparseflow/probe.txt').decode(), fs.ls('sparseflow'))"],
        env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.startswith("ok"), probe.stderr[-2000:]
    # every socket the cluster's processes listen on is on loopback
    exposed = []
    for process in marked_processes(cluster.state.instance, CLUSTER_MARKER):
        try:
            exposed += [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK]
        except psutil.NoSuchProcess:
            continue
    assert not exposed, exposed


def test_down_stops_everything_and_is_idempotent(cluster: Cluster) -> None:
    records = cluster.state.processes
    assert {r.name for r in records} == {"s3", "prefect", "ray", "worker-1", "api"}
    down = _cli("down", env=cluster.env, timeout=180)
    assert down.returncode == 0, down.stderr[-2000:]
    for record in records:
        assert f"stopped {record.name}" in down.stdout, down.stdout
    assert not ClusterState.path(cluster.home).exists()
    alive = []
    for record in records:
        try:
            process = psutil.Process(record.pid)
            if abs(process.create_time() - record.created) < 0.5 and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(record.name)
        except psutil.NoSuchProcess:
            continue
    assert not alive, f"still running after down: {alive}"
    left = marked_processes(cluster.state.instance, CLUSTER_MARKER)
    assert not left, f"marked processes left: {[p.name() for p in left]}"
    again = _cli("down", env=cluster.env, timeout=60)
    assert again.returncode == 0 and "no local cluster recorded" in again.stdout


def test_up_without_postgres_fails_clearly_and_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = _cli("up", "--postgres", "postgresql://postgres@127.0.0.1:1/postgres", env=_base_env(home), timeout=120)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "postgres" in message and "127.0.0.1:1" in message and "--postgres" in message, message
    assert not ClusterState.path(home).exists()
