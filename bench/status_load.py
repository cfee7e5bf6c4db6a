"""Status endpoint under load, and artifact download speed with Range resumption, against a real server.

For each store (SQLite file, PostgreSQL on 127.0.0.1:5432 in a fresh database that is dropped afterwards)
this seeds one job shaped like a real one (~830 metrics: per-layer prune values, a fine-tuning time series,
an evaluation) and one large artifact (a sparse-written file), starts `uvicorn` on loopback as a
subprocess, then measures:

- `GET /v1/jobs/{id}` at 1, 8 and 32 concurrent connections: p50/p99 latency and requests/s (`wrk` if it
  is installed, else an httpx async client; fixed durations);
- `GET /healthz` at 32 connections, as the framework's own ceiling on this machine;
- the artifact: the first HEAD (the server hashes it once, having no fingerprint yet), a full download,
  then half of it with `Range`, stopped, and the rest resumed with `Range` + `If-Range` (sha256 checked).

Results go to bench/results/status_load.json (machine, versions, command) and a table is printed.

    .venv/bin/python bench/status_load.py                       # both stores, 1/8/32 clients, 10 s each
    .venv/bin/python bench/status_load.py --stores sqlite --duration 5 --workers 1 --download-mib 256
    .venv/bin/python bench/status_load.py --status-cache-s 0    # every status request reads the store
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(settings: Any, download_bytes: int) -> tuple[str, str]:
    """A job with ~830 metrics over four stages and a large file artifact; returns (job id, artifact id)."""
    from orchestrator.service import Orchestrator
    from orchestrator.store import queries
    from workers.storage import ArtifactStorage

    orchestrator = Orchestrator(settings)
    scratch = Path(tempfile.mkdtemp(prefix="sf-bench-"))
    try:
        with orchestrator.sessions.begin() as session:
            job = queries.create_job(session, name="bench", recipe={"name": "bench", "model": "tiny"},
                                     stages=[("calibrate", {}), ("prune", {}), ("finetune", {}), ("evaluate", {})],
                                     code_version="bench", package_versions={"torch": "x"})
            calibrate, prune, finetune, evaluate = (run.id for run in job.stage_runs)

            def add(run: str, points: list[tuple[str, float, int]]) -> None:
                queries.add_metrics(session, job_id=job.id, stage_run_id=run, metrics=points)

            add(calibrate, [("calibration_tokens", 4096.0, 0), ("stage_seconds", 1.5, 0)])
            add(prune, [("sparsity", 0.5, 0), ("prune_time_s", 12.0, 0), ("stage_seconds", 14.0, 0)] + [
                (f"{kind}.model.layers.{i}.mlp.{proj}", 0.5, 0) for i in range(32)
                for proj in ("up_proj", "down_proj", "gate_proj") for kind in ("sparsity", "time_s", "recon_error",
                                                                               "damping")])
            add(finetune, [(name, 1.0 + step, step) for step in range(100)
                           for name in ("loss", "loss_ce", "lr", "tokens_per_s")] + [("stage_seconds", 30.0, 0)])
            add(evaluate, [("perplexity", 21.5, 0), ("dense_perplexity", 20.1, 0), ("sparsity", 0.49, 0),
                           ("param_count", 1.1e9, 0), ("nonzero_params", 5.6e8, 0), ("model_size_bytes", 2.2e9, 0),
                           ("stage_seconds", 5.0, 0)] + [(f"sparsity.layer.{i}", 0.5, 0) for i in range(32)])
            big = scratch / "weights.bin"
            with big.open("wb") as handle:  # sparse: a few marked blocks, holes elsewhere
                for offset in range(0, download_bytes, 64 << 20):
                    handle.seek(offset)
                    handle.write(offset.to_bytes(8, "little") * 512)
                handle.truncate(download_bytes)
            stored = ArtifactStorage(settings.artifacts_url, settings.cache_dir / "artifacts").put(
                big, job_id=job.id, label="01-prune", kind="masks")
            artifact = queries.add_artifact(session, job_id=job.id, kind="masks", uri=stored.uri,
                                            sha256=stored.sha256, size_bytes=stored.size_bytes, stage_run_id=prune)
            metric_count = len(queries.job_metrics(session, job.id))
            print(f"seeded job {job.id}: {metric_count} metrics; artifact {artifact.id}: {stored.size_bytes} bytes")
            return job.id, artifact.id
    finally:
        orchestrator.close()
        shutil.rmtree(scratch, ignore_errors=True)


class Server:
    """`uvicorn --factory api.app:create_app` on loopback, in its own process group."""

    def __init__(self, env: dict[str, str], workers: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
                        "--port", str(self.port), "--workers", str(workers), "--no-access-log",
                        "--log-level", "warning"]
        for option, module in (("--loop", "uvloop"), ("--http", "httptools")):
            try:
                __import__(module)
                self.command += [option, module]
            except ImportError:
                pass
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, start_new_session=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("server did not answer /healthz within 300 s")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def load_wrk(url: str, clients: int, duration: float) -> dict[str, Any]:
    threads = min(clients, 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{clients}", f"-d{int(duration)}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    latency = {p: _seconds(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"tool": "wrk", "requests": requests, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency["50"] * 1e3, "p99_ms": latency["99"] * 1e3,
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1).strip() if socket_errors else ""}


async def _load_httpx(url: str, clients: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        stop = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    answer = await client.get(url)
                except httpx.TransportError:  # a reset or refused connection is an error to count, not a crash
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                errors += answer.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1e3  # noqa: E731
    return {"tool": "httpx", "requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": pick(0.5),
            "p99_ms": pick(0.99), "errors": errors, "socket_errors": ""}


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    import psutil

    found = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            found[pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return found


def _cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings by processes alive at the second (a process that ended in
    between is left out rather than counted negative)."""
    return sum(max(cpu - before.get(pid, 0.0), 0.0) for pid, cpu in after.items())


def _own_and_children_cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load(url: str, clients: int, duration: float, server_pids: list[int] | None = None,
         db_pids: Callable[[], list[int]] | None = None) -> dict[str, Any]:
    """One load level; with the server's (and database backends') pids it also reports CPU per request.

    CPU per request is what a shared, busy machine cannot distort much: on 2 dedicated cores the
    CPU-bound ceiling is 2000 ms / (server + database + client CPU ms per request).
    """
    server_before, db_before = _cpu_by_pid(server_pids or []), _cpu_by_pid(db_pids() if db_pids else [])
    client_before = _own_and_children_cpu_s()
    load_before = os.getloadavg()[0]
    row = load_wrk(url, clients, duration) if shutil.which("wrk") else asyncio.run(_load_httpx(url, clients, duration))
    row["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if server_pids and row["requests"]:
        per = lambda cpu: round(cpu * 1e3 / row["requests"], 3)  # noqa: E731
        row["server_cpu_ms_per_req"] = per(_cpu_spent(server_before, _cpu_by_pid(server_pids)))
        row["db_cpu_ms_per_req"] = per(_cpu_spent(db_before, _cpu_by_pid(db_pids() if db_pids else [])))
        row["client_cpu_ms_per_req"] = per(_own_and_children_cpu_s() - client_before)
        spent = row["server_cpu_ms_per_req"] + row["db_cpu_ms_per_req"] + row["client_cpu_ms_per_req"]
        row["cpu_bound_rps_on_2_cores"] = round(2000 / spent, 1) if spent else None
    return row


def _server_pids(server: Server) -> list[int]:
    import psutil

    root = psutil.Process(server.process.pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


def _postgres_backends(database: str) -> list[int]:
    import psutil

    with psycopg_connect() as connection:
        rows = connection.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)).fetchall()
    return [pid for (pid,) in rows if psutil.pid_exists(pid)]


def psycopg_connect() -> Any:
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)


def _fetch(client: httpx.Client, url: str, digest: Any, headers: dict[str, str], stop_after: int | None = None
           ) -> tuple[int, int, dict[str, str]]:
    got = 0
    with client.stream("GET", url, headers=headers) as answer:
        for chunk in answer.iter_raw(1 << 20):
            digest.update(chunk)
            got += len(chunk)
            if stop_after is not None and got >= stop_after:
                break
        return answer.status_code, got, dict(answer.headers)


def download(base: str, artifact_id: str, size: int, sha256: str) -> dict[str, Any]:
    url = f"{base}/v1/artifacts/{artifact_id}/download"
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        head = client.head(url)
        first_head_s = time.perf_counter() - started
        assert head.status_code == 200 and int(head.headers["content-length"]) == size, head.headers
        etag = head.headers["etag"]
        started = time.perf_counter()
        digest = hashlib.sha256()
        status, got, _ = _fetch(client, url, digest, {})
        full_s = time.perf_counter() - started
        assert status == 200 and got == size and digest.hexdigest() == sha256
        half = size // 2
        started = time.perf_counter()
        digest = hashlib.sha256()
        status, got, _ = _fetch(client, url, digest, {"Range": f"bytes=0-{half - 1}"})
        assert status == 206 and got == half
        status, rest, headers = _fetch(client, url, digest, {"Range": f"bytes={half}-", "If-Range": etag})
        resumed_s = time.perf_counter() - started
        assert status == 206 and rest == size - half and headers["content-range"] == f"bytes {half}-{size - 1}/{size}"
        assert digest.hexdigest() == sha256, "the resumed halves do not join into the artifact"
    mib = size / (1 << 20)
    return {"bytes": size, "first_head_s": round(first_head_s, 3), "full_s": round(full_s, 3),
            "full_mib_s": round(mib / full_s, 1), "half_then_resume_s": round(resumed_s, 3),
            "half_then_resume_mib_s": round(mib / resumed_s, 1)}


def _postgres_database(name: str, create: bool) -> None:
    with psycopg_connect() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')


def run_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.settings import Settings

    home = Path(tempfile.mkdtemp(prefix=f"sf-bench-{store}-"))
    database = f"sparseflow_bench_{os.getpid()}"
    url = None
    if store == "postgres":
        _postgres_database(database, create=True)
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    try:
        settings = Settings(home=home, database_url=url, artifact_root=None, ray_address=None)
        job_id, artifact_id = seed(settings, args.download_mib << 20)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEFLOW_")}
        env.update({"SPARSEFLOW_HOME": str(home), "PYTHONPATH": str(ROOT),
                    "SPARSEFLOW_STATUS_CACHE_S": str(args.status_cache_s)})
        if url:
            env["SPARSEFLOW_DATABASE_URL"] = url
        result: dict[str, Any] = {"store": store, "workers": args.workers, "status_cache_s": args.status_cache_s,
                                  "status": {}}
        with Server(env, args.workers) as server:
            result["server_command"] = " ".join(server.command[1:])
            status_url = f"{server.url}/v1/jobs/{job_id}"
            body = httpx.get(status_url).content
            result["status_bytes"] = len(body)
            load(status_url, 32, 2)  # warm-up: connections, caches
            pids = _server_pids(server)
            db_pids = (lambda: _postgres_backends(database)) if store == "postgres" else None
            result["processes"] = {"server": len(pids)}
            for clients in args.clients:
                row = load(status_url, clients, args.duration, pids, db_pids)
                result["status"][str(clients)] = row
                print(f"{store:8} status  {clients:>2} clients: p50 {row['p50_ms']:7.2f} ms  "
                      f"p99 {row['p99_ms']:7.2f} ms  {row['rps']:8.1f} req/s  errors {row['errors']}  "
                      f"cpu/req server {row['server_cpu_ms_per_req']} db {row['db_cpu_ms_per_req']} "
                      f"client {row['client_cpu_ms_per_req']} ms")
            result["healthz_32"] = load(f"{server.url}/healthz", 32, args.duration, pids)
            sha = httpx.get(f"{server.url}/v1/artifacts/{artifact_id}").json()["sha256"]
            result["download"] = download(server.url, artifact_id, args.download_mib << 20, sha)
            print(f"{store:8} download: {result['download']}")
        return result
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if store == "postgres":
            _postgres_database(database, create=False)


def machine() -> dict[str, Any]:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else ""
    versions = {}
    for package in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "sqlalchemy", "psycopg", "httpx",
                    "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import sqlite3

    versions["sqlite"] = sqlite3.sqlite_version
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=5) as connection:
            versions["postgresql"] = connection.execute("SHOW server_version").fetchone()[0]
    except Exception as error:  # reported, not fatal: the SQLite half still runs
        versions["postgresql"] = f"unavailable: {error}"
    if shutil.which("wrk"):
        versions["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "load_avg_at_start": os.getloadavg(),
            "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per load level.")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes.")
    parser.add_argument("--status-cache-s", type=float, default=0.5,
                        help="The server's status_cache_s (0: every status request reads the store).")
    parser.add_argument("--download-mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "status_load.json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for store in args.stores.split(","):
        report["runs"].append(run_store(store, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'store':9}{'clients':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>7}"
          f"{'srv cpu':>9}{'db cpu':>8}{'cli cpu':>9}{'2-core ceiling':>16}")
    for run in report["runs"]:
        rows = [(str(c), row) for c, row in run["status"].items()] + [("32 hz", run["healthz_32"])]
        for clients, row in rows:
            print(f"{run['store']:9}{clients:>8}{row['p50_ms']:9.2f}{row['p99_ms']:9.2f}{row['rps']:9.1f}"
                  f"{row['errors']:7}{row.get('server_cpu_ms_per_req', 0):9.2f}{row.get('db_cpu_ms_per_req', 0):8.2f}"
                  f"{row.get('client_cpu_ms_per_req', 0):9.2f}{row.get('cpu_bound_rps_on_2_cores') or 0:16.1f}")
    for run in report["runs"]:
        d = run["download"]
        print(f"{run['store']:9} download {d['bytes'] >> 20} MiB: first HEAD {d['first_head_s']} s (server hashes it), "
              f"full {d['full_mib_s']} MiB/s, half + resumed {d['half_then_resume_mib_s']} MiB/s; "
              f"status body {run['status_bytes']} bytes")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
