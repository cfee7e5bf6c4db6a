"""`sparseflow up` / `sparseflow down`: the whole distributed service on one machine, for trials and tests.

Parts, started in this order, each waited for (with a time bound) before the next one starts:

    postgres  the server already on 127.0.0.1:5432; the databases for our store and for Prefect are
              created if missing. Nothing is started: without a reachable server `up` says so and stops.
    s3        moto's S3 server with one bucket: a stand-in. Real deployments bring S3 or MinIO.
    prefect   a Prefect server on that PostgreSQL.
    ray       a Ray head that listens on loopback only.
    deploy    `sparseflow deploy`: registers the work pool and the compression-job deployment.
    worker-N  Prefect workers (`sparseflow worker`), one job at a time each, each with its healthcheck
              (GET /health) on a port of its own.
    api       `sparseflow serve` in cluster mode (SPARSEFLOW_PREFECT_API_URL is set).

Every process gets the same environment (`cluster_env`), runs in a process group of its own, logs to
<home>/cluster/logs/<part>.log and carries this cluster's marker (SPARSEFLOW_LOCAL_CLUSTER=<id>), so
`down` also finds what they started in turn (Ray's raylet and workers, Prefect's flow-run processes).
We never run `ray stop`: it stops every Ray node of the user on the machine, not just this one. The
state (pids, process groups, ports, environment, logs) is in <home>/cluster/state.json; `down` reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from api.reaper import sweep

CLUSTER_MARKER = "SPARSEFLOW_LOCAL_CLUSTER"
S3_KEY = "sparseflow-local"  # moto accepts any credentials; these only have to be consistent
S3_REGION = "us-east-1"
GRACE_S = 10.0
_POLL_S = 0.5
_NOT_EXPORTED = {CLUSTER_MARKER, "PREFECT_API_DATABASE_CONNECTION_URL", "PYTHONUNBUFFERED"}
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ClusterError(RuntimeError):
    """A part could not be started (or the cluster's state is unusable); the message says which."""


@dataclass
class ClusterConfig:
    """What `sparseflow up` starts; ports left None are picked free at start."""

    home: Path
    workers: int = 2
    gpus: int = 0
    cpus: int | None = None
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    store_db: str = "sparseflow_local"
    prefect_db: str = "prefect_local"
    bucket: str = "sparseflow"
    api_port: int | None = None
    prefect_port: int | None = None
    ray_port: int | None = None
    s3_port: int | None = None
    ray_dashboard: bool = False
    deploy: bool = True
    work_pool: str = "sparseflow"
    timeout_s: float = 180.0


@dataclass
class ProcessRecord:
    """One started process: enough for `down` to stop exactly it (create_time guards against pid reuse)."""

    name: str
    pid: int
    pgid: int
    created: float
    argv: list[str]
    log: str
    address: str = ""


@dataclass
class ClusterState:
    instance: str
    home: str
    env: dict[str, str]
    ports: dict[str, int]
    urls: dict[str, str]
    processes: list[ProcessRecord] = field(default_factory=list)

    @staticmethod
    def path(home: Path) -> Path:
        return home / "cluster" / "state.json"

    def save(self) -> None:
        path = self.path(Path(self.home))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, home: Path) -> ClusterState | None:
        path = cls.path(home)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            data["processes"] = [ProcessRecord(**p) for p in data["processes"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as error:
            raise ClusterError(f"unreadable cluster state {path}: {error}") from error

    def exports(self) -> list[str]:
        """Shell lines that point a client (CLI, prefect, ray, s3fs) at this cluster.

        Never the marker: whatever a shell with it started would be stopped by `down`.
        """
        import shlex

        values = {key: value for key, value in self.env.items() if key not in _NOT_EXPORTED}
        values["SPARSEFLOW_URL"] = self.urls["api"]
        return [f"export {key}={shlex.quote(value)}" for key, value in sorted(values.items())]


@dataclass
class Part:
    """A process to start: its command, how to tell it is ready, and what to do once it is."""

    name: str
    argv: list[str]
    ready: Callable[[ProcessRecord], bool]
    address: str = ""
    oneshot: bool = False  # runs to completion (exit 0 = done) instead of staying up
    after: Callable[[], None] | None = None
    attempts: int = 1


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str, hint: str) -> str:
    """An executable of this Python environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ClusterError(f"{name} not found: {hint}")
    return found


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _alive(record: ProcessRecord) -> bool:
    try:
        process = psutil.Process(record.pid)
        return abs(process.create_time() - record.created) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ensure_databases(admin_url: str, names: list[str]) -> None:
    """Create the databases in `names` that the PostgreSQL server at `admin_url` lacks."""
    import psycopg
    from psycopg import errors, sql
    from sqlalchemy.engine import make_url

    for name in names:
        if not _DB_NAME.match(name):
            raise ClusterError(f"postgres: database name {name[:64]!r} must be a plain identifier (letters, digits, _)")
    url = make_url(admin_url).set(drivername="postgresql")
    where = url.render_as_string(hide_password=True)
    try:
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in existing:
                    with contextlib.suppress(errors.DuplicateDatabase):  # another `up` made it meanwhile
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as error:
        raise ClusterError(
            f"postgres: no PostgreSQL server answers at {where} ({str(error).strip()[:300]}). Start one "
            "(for example `bash scripts/ensure-postgres.sh`) or pass --postgres with its URL."
        ) from error


def database_url(admin_url: str, driver: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(drivername=f"postgresql+{driver}", database=name).render_as_string(
        hide_password=False)


# ---------------------------------------------------------------- the parts


def cluster_env(config: ClusterConfig, instance: str, ports: dict[str, int]) -> dict[str, str]:
    """The environment every part gets (on top of ours), and what `export` lines hand to clients."""
    s3 = f"http://127.0.0.1:{ports['s3']}"
    prefect_api = f"http://127.0.0.1:{ports['prefect']}/api"
    return {
        CLUSTER_MARKER: instance,
        "SPARSEFLOW_HOME": str(config.home),
        "SPARSEFLOW_DATABASE_URL": database_url(config.postgres_url, "psycopg", config.store_db),
        "SPARSEFLOW_ARTIFACT_ROOT": f"s3://{config.bucket}/artifacts",
        "SPARSEFLOW_RAY_ADDRESS": f"127.0.0.1:{ports['ray']}",
        "SPARSEFLOW_PREFECT_API_URL": prefect_api,
        "SPARSEFLOW_WORK_POOL": config.work_pool,
        # S3 for boto (AWS_ENDPOINT_URL_S3) and for fsspec's s3 (its FSSPEC_<PROTOCOL>_<ARG> config)
        "AWS_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL_S3": s3,
        "FSSPEC_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(config.home / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(config.postgres_url, "asyncpg", config.prefect_db),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Ray replaces a loopback address by the host's IP (and then fails to reach a loopback-only
        # head) unless its single-machine mode is on: every client of this head needs it
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # the head's own token, not the user's shared ~/.ray/auth_token
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_token_path(config.home)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }


def ray_token_path(home: Path) -> Path:
    return home / "cluster" / "ray_auth_token"


def _write_ray_token(home: Path) -> None:
    """A fresh token for this cluster's Ray, readable by this user only."""
    import secrets

    path = ray_token_path(home)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))


def _make_bucket(config: ClusterConfig, endpoint: str) -> None:
    import s3fs

    # no region here: s3fs would send it as a LocationConstraint, which us-east-1 must not have
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_KEY, endpoint_url=endpoint, skip_instance_cache=True)
    try:
        if not fs.exists(config.bucket):
            fs.mkdir(config.bucket)
    except OSError as error:
        raise ClusterError(f"s3: could not create bucket {config.bucket!r} at {endpoint}: {error}") from error


def _worker_registered(prefect_api: str, pool: str, name: str) -> bool:
    try:
        response = httpx.post(f"{prefect_api}/work_pools/{pool}/workers/filter", json={}, timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(w.get("name") == name for w in response.json())


def _log_says(text: str) -> Callable[[ProcessRecord], bool]:
    return lambda record: text in log_tail(record.log, 200)


def parts(config: ClusterConfig, ports: dict[str, int]) -> list[Part]:
    """The processes of a local cluster, in start order."""
    s3 = f"http://127.0.0.1:{ports['s3']}"
    prefect_api = f"http://127.0.0.1:{ports['prefect']}/api"
    api = f"http://127.0.0.1:{ports['api']}"
    sparseflow = [sys.executable, "-m", "api.cli"]
    ray = [_tool("ray", "install Ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(ports["ray"]), "--num-cpus", str(config.cpus or os.cpu_count() or 1),
           "--num-gpus", str(config.gpus), "--disable-usage-stats"]
    if config.ray_dashboard:
        ray += ["--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                str(ports["ray_dashboard"])]
    else:
        ray += ["--include-dashboard=false"]
    found = [
        Part("s3", [_tool("moto_server", "pip install 'sparseflow[test]' (moto[server])"), "-H", "127.0.0.1",
                    "-p", str(ports["s3"])],
             ready=lambda _: _http_ok(s3), address=f"{s3} (bucket {config.bucket})",
             after=lambda: _make_bucket(config, s3)),
        Part("prefect", [_tool("prefect", "install Prefect"), "server", "start", "--host", "127.0.0.1",
                         "--port", str(ports["prefect"])],
             ready=lambda _: _http_ok(f"{prefect_api}/health"), address=prefect_api),
        # the raylet gives its Python agents 15 s to report their ports and aborts otherwise, which a busy
        # machine can miss while their imports are cold: a second attempt finds them warm
        Part("ray", ray, ready=_log_says("Ray runtime started"), address=f"127.0.0.1:{ports['ray']}", attempts=3),
    ]
    if config.deploy:
        found.append(Part("deploy", sparseflow + ["deploy"], ready=lambda _: True, oneshot=True))
    for n in range(1, config.workers + 1):
        name, health = f"local-worker-{n}", ports[f"worker-{n}-health"]
        found.append(Part(
            f"worker-{n}", sparseflow + ["worker", "--pool", config.work_pool, "--limit", "1", "--name", name,
                                         "--health-port", str(health)],
            ready=lambda _, name=name: _worker_registered(prefect_api, config.work_pool, name),
            address=f"pool {config.work_pool}, health http://127.0.0.1:{health}/health"))
    found.append(Part("api", sparseflow + ["serve", "--host", "127.0.0.1", "--port", str(ports["api"])],
                      ready=lambda _: _http_ok(f"{api}/healthz"), address=api))
    return found


# ---------------------------------------------------------------- up / down


def _spawn(part: Part, env: dict[str, str], logs: Path, attempt: int = 1) -> tuple[subprocess.Popen, ProcessRecord]:
    log_path = logs / f"{part.name}.log"
    with open(log_path, "wb" if attempt == 1 else "ab") as log_file:  # a fresh log per `up`
        process = subprocess.Popen(part.argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    created = psutil.Process(process.pid).create_time()
    return process, ProcessRecord(part.name, process.pid, process.pid, created, part.argv, str(log_path),
                                  part.address)


def _wait_ready(part: Part, process: subprocess.Popen, record: ProcessRecord, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if part.oneshot and code is not None:
            if code == 0:
                return
            raise ClusterError(f"{part.name} exited with code {code}; its log ({record.log}) ends:\n"
                               f"{log_tail(record.log)}")
        if code is not None:
            raise ClusterError(f"{part.name} exited with code {code} while starting; its log ({record.log}) "
                               f"ends:\n{log_tail(record.log)}")
        if not part.oneshot and part.ready(record):
            return
        time.sleep(_POLL_S)
    raise ClusterError(f"{part.name} was not ready within {timeout_s:g} s; its log ({record.log}) ends:\n"
                       f"{log_tail(record.log)}")


def running(home: Path) -> ClusterState | None:
    """The recorded cluster if any of its processes is still alive."""
    state = ClusterState.load(home)
    if state and any(_alive(record) for record in state.processes):
        return state
    return None


def up(config: ClusterConfig, echo: Callable[[str], None] = print) -> ClusterState:
    """Start every part and wait for each; on any failure stop what was started and raise ClusterError."""
    config.home = config.home.expanduser().resolve()
    if (state := running(config.home)) is not None:
        alive = ", ".join(f"{r.name}[{r.pid}]" for r in state.processes if _alive(r))
        raise ClusterError(f"a local cluster already runs from {config.home} ({alive}): `sparseflow down` first")
    ensure_databases(config.postgres_url, [config.store_db, config.prefect_db])
    echo(f"postgres  databases {config.store_db}, {config.prefect_db} ready")
    given = {"api": config.api_port, "prefect": config.prefect_port, "ray": config.ray_port, "s3": config.s3_port,
             "ray_dashboard": None}
    given.update({f"worker-{n}-health": None for n in range(1, config.workers + 1)})
    ports = {name: port or free_port() for name, port in given.items()}
    if not config.ray_dashboard:
        del ports["ray_dashboard"]
    instance = uuid.uuid4().hex
    env = cluster_env(config, instance, ports)
    logs = config.home / "cluster" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (config.home / "prefect").mkdir(parents=True, exist_ok=True)
    _write_ray_token(config.home)
    state = ClusterState(instance, str(config.home), env, ports, urls={
        "api": f"http://127.0.0.1:{ports['api']}", "prefect": env["PREFECT_API_URL"],
        "ray": env["SPARSEFLOW_RAY_ADDRESS"], "s3": env["AWS_ENDPOINT_URL_S3"]})
    full_env = {**os.environ, **env}
    full_env.pop("SPARSEFLOW_URL", None)
    try:
        for part in parts(config, ports):
            started = time.monotonic()
            for attempt in range(1, part.attempts + 1):
                process, record = _spawn(part, full_env, logs, attempt)
                if not part.oneshot:
                    state.processes.append(record)
                    state.save()
                try:
                    _wait_ready(part, process, record, config.timeout_s)
                    break
                except ClusterError as error:
                    if attempt == part.attempts:
                        raise
                    echo(f"{part.name:<9} attempt {attempt} failed ({str(error).splitlines()[0]}); retrying")
                    _signal_group(record.pgid, signal.SIGKILL)
                    process.wait(GRACE_S)
                    state.processes.remove(record)
            if part.after:
                part.after()
            echo(f"{part.name:<9} ready in {time.monotonic() - started:4.1f} s  {part.address}")
    except BaseException:
        stop(state, echo=lambda line: None)
        ClusterState.path(config.home).unlink(missing_ok=True)
        raise
    return state


def stop(state: ClusterState, echo: Callable[[str], None] = print, grace_s: float = GRACE_S) -> list[str]:
    """Stop the recorded processes (last started first), then whatever still carries the cluster's marker."""
    stopped = []
    for record in reversed(state.processes):
        if not _alive(record):
            continue
        _signal_group(record.pgid, signal.SIGTERM)
        try:
            psutil.Process(record.pid).wait(grace_s)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            echo(f"{record.name} did not stop within {grace_s:g} s: killed")
        _signal_group(record.pgid, signal.SIGKILL)  # whatever of its group is left
        stopped.append(f"{record.name}[{record.pid}]")
        echo(f"stopped {record.name} (pid {record.pid})")
    leftovers = sweep(state.instance, marker=CLUSTER_MARKER, grace_s=grace_s)
    if leftovers:
        echo(f"stopped {len(leftovers)} processes they had started: {', '.join(leftovers)}")
    return stopped + leftovers


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def down(home: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Stop the cluster recorded under `home`; idempotent (nothing recorded: nothing to do)."""
    home = home.expanduser().resolve()
    state = ClusterState.load(home)
    if state is None:
        echo(f"no local cluster recorded under {home}")
        return []
    stopped = stop(state, echo)
    ClusterState.path(home).unlink(missing_ok=True)
    if not stopped:
        echo("nothing was running")
    return stopped
