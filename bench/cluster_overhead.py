"""Cluster mode against embedded mode on the same tiny job: dispatch latency, per-stage overhead, GPU packing.

Both modes run the same jobs of stand-in `sleep` stages (pipelines/stages/sleep.py) against the same store
(PostgreSQL), the same artifact root (S3 on moto) and the same Ray head with logical GPUs, all real processes
started by `api.localcluster.up` (Prefect server, Ray head, S3 stand-in, two `sparseflow worker`s of one slot
each, the API in cluster mode) plus extra workers this bench starts for more slots. The only difference is who
runs the flow:

- embedded: `Orchestrator(settings).start(job_id)` in this process, a thread pool of `max_concurrent_jobs`
  (Prefect in its ephemeral mode, as a plain `sparseflow serve` has it);
- cluster: `POST /v1/jobs` to the cluster's API, which creates a flow run of the `compression-job`
  deployment; a Prefect worker starts it as a process of its own.

Measured (every time is read back from the store, so both modes are timed by the same clock and rows):

1. first-stage latency: from `jobs.created_at` to the first stage's code starting on its Ray worker (the
   sleep marker's `started_at`), for a one-stage job: everything a job pays once (dispatch, the flow's
   start, a Ray worker's start and imports). Also reported: to stage 0 being marked running (before Ray
   places it). The first job of each mode is reported apart as cold, then `--repeats` warm ones.
2. orchestration overhead per stage: a job of `--stages` sleep stages of `--stage-seconds` each;
   (job finished_at - the first stage's code starting - sum of the stages' `stage_seconds` metrics) /
   stages. Goal: <= 0.1 s. Also reported: the same from stage 0 marked running (so the job's one Ray
   worker start is spread over its stages), and the median gaps per stage (marked running -> its code
   starts, its code ends -> marked succeeded, succeeded -> the next marked running).
3. GPU packing: `--jobs` jobs at once, each one sleep stage of `--parallel-seconds` asking for
   `{num_gpus: 1, num_cpus: 0.5}` of a Ray head with `--gpus` logical GPUs; wall = first jobs.created_at
   to last jobs.finished_at. Goal: >= 3.5x the serial wall time for 8 jobs on 4 GPUs. Two speedups: over
   the measured serial wall (`--serial`: the same jobs run one after another, each submitted when the
   previous one ended, so each one's dispatch and start included), and over the bare serial sum of the
   sleeps (jobs x seconds, which no serial run can reach). Also reported, from the stages' `marker`
   artifacts (when each really slept, i.e. held its Ray resources): the speedup over the sleeps' span,
   the most sleeps at once (at most `--gpus`), and the pairs of overlapping sleeps given the same GPU
   (must be 0). The store's stage span is reported too, but a stage is marked running before Ray places
   it, so it includes the wait for a free GPU.

Results go to bench/results/cluster_overhead.json (machine, load averages, versions, command) and a table is
printed. Everything started is stopped at the end (`api.localcluster.down` plus this bench's own workers).

    .venv/bin/python bench/cluster_overhead.py
    .venv/bin/python bench/cluster_overhead.py --parallel-seconds 60 --modes cluster --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULTS = ROOT / "bench" / "results" / "cluster_overhead.json"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
STORE_DB, PREFECT_DB = "sparseflow_bench_overhead", "prefect_bench_overhead"
FINAL = {"succeeded", "failed", "cancelled"}
PARALLEL_RESOURCES = {"num_gpus": 1, "num_cpus": 0.5}
JOB_TIMEOUT_S = 600.0  # on top of the stages' own time; a loaded 2-core machine starts a flow run in minutes


# ------------------------------------------------------------------------------------------- jobs


def sleep_recipe(name: str, model_dir: Path, seconds: list[float], resources: dict | None = None) -> dict:
    """A job of sleep stages; no cache reuse (identical jobs must really run) and no automatic resume."""
    stage = {"stage": "sleep", **({"resources": resources} if resources else {})}
    return {"name": name, "model": str(model_dir), "reuse_cached": False, "max_resumes": 0,
            "stages": [{**stage, "seconds": s} for s in seconds]}


def build_tiny_model(directory: Path) -> Path:
    """The tests' tiny random Llama and tokenizer, saved once (the job's source model; sleep never loads it)."""
    from tiny_models import TINY_VOCAB, build_tiny_model, build_tiny_tokenizer

    build_tiny_model(TINY_VOCAB).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


class EmbeddedMode:
    """Jobs run by this process's orchestrator (a thread pool), as the embedded API and CLI run them."""

    name = "embedded"

    def __init__(self, settings: Any) -> None:
        from orchestrator.service import Orchestrator

        self.orchestrator = Orchestrator(settings)
        self.futures: dict[str, Future] = {}

    def submit(self, recipe: dict) -> str:
        from orchestrator.lifecycle import submit_job
        from pipelines.recipe import parse_recipe

        with self.orchestrator.sessions.begin() as session:
            job_id = submit_job(session, parse_recipe(recipe)).id
        self.futures[job_id] = self.orchestrator.start(job_id)
        return job_id

    def check(self, job_ids: list[str]) -> None:
        """Raise if a job's runner thread ended in an error before the job did (it may stay queued then)."""
        for job_id in job_ids:
            future = self.futures.get(job_id)
            if future is not None and future.done() and future.exception() is not None:
                raise RuntimeError(f"job {job_id}: its embedded runner failed: {future.exception()!r}")

    def close(self) -> None:
        self.orchestrator.close()


class ClusterMode:
    """Jobs submitted to the cluster's API, which hands each to Prefect as a flow run."""

    name = "cluster"

    def __init__(self, api_url: str) -> None:
        self.client = httpx.Client(base_url=api_url, timeout=60.0)

    def submit(self, recipe: dict) -> str:
        response = self.client.post("/v1/jobs", json={"recipe": recipe})
        if response.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
        return response.json()["id"]

    def check(self, job_ids: list[str]) -> None:
        """Nothing to check here: a job the API could not hand to Prefect is recorded failed."""

    def close(self) -> None:
        self.client.close()


@dataclass
class StageTiming:
    """A stage run as the store recorded it (started: marked running, before Ray placed it) and as its sleep
    marker recorded it (slept_from/slept_to: while it held its Ray resources)."""

    started: float
    finished: float
    stage_seconds: float
    gpu_ids: str | None
    slept_from: float
    slept_to: float


@dataclass
class JobTiming:
    job_id: str
    created: float
    finished: float
    stages: list[StageTiming] = field(default_factory=list)

    @property
    def first_stage_latency(self) -> float:
        """Submission to the first stage's code starting on its Ray worker (everything a job pays once:
        dispatch, the flow's start, the Ray worker's start and imports)."""
        return self.stages[0].slept_from - self.created

    @property
    def first_stage_marked_running(self) -> float:
        """Submission to the first stage being marked running (before Ray has placed it)."""
        return self.stages[0].started - self.created

    @property
    def overhead_per_stage(self) -> float:
        """What each stage costs on top of its own time, once the job's first stage runs."""
        own = sum(s.stage_seconds for s in self.stages)
        return (self.finished - self.stages[0].slept_from - own) / len(self.stages)

    @property
    def overhead_per_stage_from_marked_running(self) -> float:
        """The same from the first stage being marked running: includes the job's Ray worker start."""
        own = sum(s.stage_seconds for s in self.stages)
        return (self.finished - self.stages[0].started - own) / len(self.stages)

    def gaps(self) -> dict[str, float]:
        """Median per stage: marked running -> its code starts (dispatch), its code ends -> marked
        succeeded (completion), succeeded -> the next one marked running (between)."""
        later = self.stages[1:]
        return {
            "dispatch": statistics.median(s.slept_from - s.started for s in later or self.stages),
            "completion": statistics.median(s.finished - s.slept_to for s in self.stages),
            "between": statistics.median(b.started - a.finished for a, b in zip(self.stages, later, strict=False))
            if later else 0.0,
        }


def _ts(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()


def wait_for(mode: Any, sessions: Any, job_ids: list[str], timeout_s: float) -> list[JobTiming]:
    """Poll the store until every job ended; raise unless all succeeded; return their timings.

    Every time reported is read from the store afterwards, so the poll only decides when to read them: once
    a second, in one query, so that the measuring process takes as little as it can of the CPU it measures.
    """
    from sqlalchemy import select

    from orchestrator.store.models import Job

    deadline = time.monotonic() + timeout_s
    while True:
        mode.check(job_ids)
        with sessions() as session:
            rows = session.execute(select(Job.id, Job.status, Job.error).where(Job.id.in_(job_ids))).all()
            states = {job_id: (status.value, error) for job_id, status, error in rows}
        if len(states) == len(job_ids) and all(status in FINAL for status, _ in states.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished within {timeout_s:g} s: {states}")
        time.sleep(1.0)
    bad = {job_id: state for job_id, state in states.items() if state[0] != "succeeded"}
    if bad:
        raise RuntimeError(f"jobs did not succeed: {bad}")
    return [job_timing(sessions, job_id) for job_id in job_ids]


def job_timing(sessions: Any, job_id: str) -> JobTiming:
    from sqlalchemy import select

    from orchestrator.store import queries
    from orchestrator.store.models import Artifact, Metric, Tag

    with sessions() as session:
        job = queries.get_job(session, job_id)
        timing = JobTiming(job_id, _ts(job.created_at), _ts(job.finished_at))
        for run in queries.stage_runs(session, job_id):
            seconds = session.scalar(select(Metric.value).where(Metric.stage_run_id == run.id,
                                                                Metric.name == "stage_seconds"))
            gpus = session.scalar(select(Tag.value).where(Tag.stage_run_id == run.id, Tag.key == "gpu_ids"))
            uri = session.scalar(select(Artifact.uri).where(Artifact.stage_run_id == run.id,
                                                            Artifact.kind == "marker"))
            marker = read_marker(uri)
            timing.stages.append(StageTiming(
                _ts(run.started_at), _ts(run.finished_at), float(seconds), gpus,
                datetime.fromisoformat(marker["started_at"]).timestamp(),
                datetime.fromisoformat(marker["finished_at"]).timestamp()))
    return timing


def read_marker(uri: str) -> dict[str, Any]:
    """A sleep stage's marker artifact, from the artifact root (S3 here)."""
    import fsspec

    with fsspec.open(uri, "rb") as handle:
        return json.loads(handle.read())


def summary(values: list[float]) -> dict[str, Any]:
    return {"values": [round(v, 4) for v in values], "median": round(statistics.median(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


# ------------------------------------------------------------------------------------ measurements


def first_stage_latency(mode: Any, sessions: Any, model_dir: Path, repeats: int) -> dict[str, Any]:
    """Submission to stage 0 starting, for a one-stage job of 0.1 s: one cold job, then `repeats` warm ones."""
    timings, round_trips = [], []
    for i in range(repeats + 1):
        sent = time.time()
        job_id = mode.submit(sleep_recipe(f"latency-{mode.name}-{i}", model_dir, [0.1]))
        round_trips.append(time.time() - sent)
        timings += wait_for(mode, sessions, [job_id], timeout_s=JOB_TIMEOUT_S)
    return {"cold_seconds": round(timings[0].first_stage_latency, 4),
            "warm": summary([t.first_stage_latency for t in timings[1:]]),
            "warm_to_marked_running": summary([t.first_stage_marked_running for t in timings[1:]]),
            "submit_call_seconds": summary(round_trips)}


def per_stage_overhead(mode: Any, sessions: Any, model_dir: Path, stages: int, seconds: float,
                       repeats: int) -> dict[str, Any]:
    """(job wall from stage 0 start to job end - sum of the stages' own stage_seconds) / stages."""
    runs = []
    for i in range(repeats):
        job_id = mode.submit(sleep_recipe(f"overhead-{mode.name}-{i}", model_dir, [seconds] * stages))
        [timing] = wait_for(mode, sessions, [job_id], timeout_s=JOB_TIMEOUT_S + stages * seconds)
        runs.append(timing)
    return {
        "stages": stages, "stage_seconds_asked": seconds,
        "overhead_per_stage_seconds": summary([t.overhead_per_stage for t in runs]),
        "overhead_per_stage_from_marked_running_seconds": summary(
            [t.overhead_per_stage_from_marked_running for t in runs]),
        "median_gaps_seconds": {k: summary([t.gaps()[k] for t in runs]) for k in ("dispatch", "completion", "between")},
        "job_wall_from_first_stage_seconds": summary([t.finished - t.stages[0].started for t in runs]),
        "sum_stage_seconds": summary([sum(s.stage_seconds for s in t.stages) for t in runs]),
        "goal_seconds": 0.1,
    }


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = open_now = 0
    for _, step in events:
        open_now += step
        best = max(best, open_now)
    return best


def shared_gpu_overlaps(stages: list[StageTiming]) -> int:
    """Pairs of stages that slept at the same time on the same (logical) GPU: must be 0."""
    clashes = 0
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            same = a.gpu_ids and b.gpu_ids and set(a.gpu_ids.split(",")) & set(b.gpu_ids.split(","))
            if same and a.slept_from < b.slept_to and b.slept_from < a.slept_to:
                clashes += 1
    return clashes


def gpu_packing(mode: Any, sessions: Any, model_dir: Path, jobs: int, seconds: float, gpus: int) -> dict[str, Any]:
    """`jobs` one-stage GPU jobs at once: wall time against the serial sum (jobs x seconds)."""
    recipe = lambda i: sleep_recipe(f"gpu-{mode.name}-{i}", model_dir, [seconds], PARALLEL_RESOURCES)  # noqa: E731
    job_ids = [mode.submit(recipe(i)) for i in range(jobs)]
    timings = wait_for(mode, sessions, job_ids, timeout_s=JOB_TIMEOUT_S + jobs * seconds)
    stages = [t.stages[0] for t in timings]
    wall = max(t.finished for t in timings) - min(t.created for t in timings)
    span = max(s.finished for s in stages) - min(s.started for s in stages)
    slept = max(s.slept_to for s in stages) - min(s.slept_from for s in stages)
    serial = jobs * seconds
    return {
        "jobs": jobs, "stage_seconds_asked": seconds, "logical_gpus": gpus, "resources": PARALLEL_RESOURCES,
        "serial_sum_seconds": serial,
        "wall_seconds": round(wall, 3),
        "speedup": round(serial / wall, 3),
        "ideal_speedup": min(jobs, gpus),
        "stage_span_seconds": round(span, 3),
        "speedup_over_stage_span": round(serial / span, 3),
        "sleep_span_seconds": round(slept, 3),
        "speedup_over_sleep_span": round(serial / slept, 3),
        "max_concurrent_sleeps": max_overlap([(s.slept_from, s.slept_to) for s in stages]),
        "max_stages_marked_running": max_overlap([(s.started, s.finished) for s in stages]),
        "sleeps_sharing_a_gpu": shared_gpu_overlaps(stages),
        "first_stage_latency_seconds": summary([t.first_stage_latency for t in timings]),
        "gpu_ids": [s.gpu_ids for s in stages],
    }


def serial_wall(mode: Any, sessions: Any, model_dir: Path, jobs: int, seconds: float) -> dict[str, Any]:
    """The same `jobs` GPU jobs one after another (each submitted when the previous one ended): the serial
    wall time that parallel packing is compared with, every job's own dispatch and start included."""
    timings = []
    for i in range(jobs):
        job_id = mode.submit(sleep_recipe(f"serial-{mode.name}-{i}", model_dir, [seconds], PARALLEL_RESOURCES))
        timings += wait_for(mode, sessions, [job_id], timeout_s=JOB_TIMEOUT_S + seconds)
    wall = timings[-1].finished - timings[0].created
    return {"jobs": jobs, "stage_seconds_asked": seconds, "wall_seconds": round(wall, 3),
            "per_job_wall_seconds": summary([t.finished - t.created for t in timings])}


# ------------------------------------------------------------------------------------- the cluster


def drop_databases(names: list[str]) -> None:
    """A fresh store and Prefect database per run, so earlier runs' rows cost nothing."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _workers_registered(prefect_api: str, pool: str, names: set[str]) -> bool:
    try:
        response = httpx.post(f"{prefect_api}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and names <= {w.get("name") for w in response.json()}


def start_extra_workers(state: Any, home: Path, count: int, limit: int, timeout_s: float) -> list[subprocess.Popen]:
    """More Prefect worker slots than `up`'s one-slot workers give: `count` workers of `limit` slots each."""
    env = {**os.environ, **state.env}
    pool = state.env["SPARSEFLOW_WORK_POOL"]
    started, names = [], set()
    for n in range(1, count + 1):
        name = f"bench-worker-{n}"
        log = open(home / "cluster" / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (closed by the child's end)
        started.append(subprocess.Popen(
            [sys.executable, "-m", "api.cli", "worker", "--pool", pool, "--limit", str(limit), "--name", name],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
        names.add(name)
    deadline = time.monotonic() + timeout_s
    while not _workers_registered(state.env["PREFECT_API_URL"], pool, names):
        if time.monotonic() > deadline or any(p.poll() is not None for p in started):
            stop_processes(started)
            raise RuntimeError(f"extra workers not registered within {timeout_s:g} s (logs: {home}/cluster/logs)")
        time.sleep(0.5)
    return started


def stop_processes(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _make_bucket(config: Any, endpoint: str) -> None:
    """The S3 stand-in's bucket. Stands in for `localcluster._make_bucket`, whose `s3fs.mkdir` sends the
    LocationConstraint us-east-1, which S3 (and moto) refuse for that region: `up` fails at its first part."""
    import s3fs

    from api import localcluster

    fs = s3fs.S3FileSystem(key=localcluster.S3_KEY, secret=localcluster.S3_KEY, endpoint_url=endpoint,
                           skip_instance_cache=True, client_kwargs={"region_name": localcluster.S3_REGION})
    if not fs.exists(config.bucket):
        fs.call_s3("create_bucket", Bucket=config.bucket)


def ray_token_auth(scratch: Path) -> None:
    """One Ray auth token for the head and every client, through the environment all parts inherit.

    Ray 2.60's `ray start --head` turns token auth on whenever ~/.ray/auth_token exists (any local
    `ray.init()` writes it), while a client given an explicit address (`ray.init(address=...)`, as
    `workers.local_ray.connect_address` calls it) does not: every flow run then fails with InvalidAuthToken.
    Setting the mode and a token file of this run's own makes both sides agree whatever ~/.ray holds.
    """
    import secrets

    token = scratch / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


@contextlib.contextmanager
def local_cluster(home: Path, gpus: int, cpus: int, extra_workers: int, extra_limit: int,
                  timeout_s: float) -> Iterator[Any]:
    """`sparseflow up` (2 one-slot workers) plus extra workers; always stopped on the way out."""
    from api import localcluster

    drop_databases([STORE_DB, PREFECT_DB])
    localcluster._make_bucket = _make_bucket  # see _make_bucket
    config = localcluster.ClusterConfig(home=home, workers=2, gpus=gpus, cpus=cpus, postgres_url=POSTGRES_ADMIN,
                                        store_db=STORE_DB, prefect_db=PREFECT_DB, timeout_s=timeout_s)
    started = time.monotonic()
    extra: list[subprocess.Popen] = []
    try:
        state = localcluster.up(config, echo=lambda line: print(f"  {line}", flush=True))
        extra = start_extra_workers(state, home, extra_workers, extra_limit, timeout_s) if extra_workers else []
        print(f"  cluster up in {time.monotonic() - started:.1f} s", flush=True)
        yield state
    finally:
        stop_processes(extra)
        localcluster.down(home, echo=lambda line: print(f"  {line}", flush=True))


def use_cluster_clients(state: Any) -> None:
    """Let this process reach the cluster's S3 and Ray as a client; Prefect stays ephemeral here (embedded)."""
    import fsspec.config

    for key, value in state.env.items():
        if key.startswith(("AWS_", "FSSPEC_", "RAY_")):
            os.environ[key] = value
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read FSSPEC_* when it was imported, before these


# ------------------------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    from orchestrator.lifecycle import code_version, package_versions

    return {"cpu_count": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "code_version": code_version(), "packages": package_versions()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(label: str, loads: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"{label} ...", flush=True)
    before = load_average()
    result = fn()
    loads[label] = {"before": before, "after": load_average()}
    print(f"  {json.dumps(result)}", flush=True)
    return result


def print_table(results: dict[str, Any]) -> None:
    rows = []
    modes = results["modes"]
    for name, entry in modes.items():
        latency, overhead, packing = entry.get("latency"), entry.get("overhead"), entry.get("packing")
        rows.append((name,
                     f"{latency['cold_seconds']:.2f} / {latency['warm']['median']:.2f}" if latency else "-",
                     f"{overhead['overhead_per_stage_seconds']['median']:.3f}" if overhead else "-",
                     f"{packing['speedup']['median']:.2f}x / "
                     + (f"{packing['speedup_over_serial_wall']['median']:.2f}x"
                        if "speedup_over_serial_wall" in packing else "-") if packing else "-"))
    print(f"\n{'mode':<10} {'1st stage s cold/warm':>22} {'overhead s/stage':>17} "
          f"{'packing: sleeps / serial wall':>30}")
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>22} {row[2]:>17} {row[3]:>30}")
    if "embedded" in modes and "cluster" in modes:
        print("\ncluster / embedded ratios:", json.dumps(results["ratios"]))


def ratios(modes: dict[str, Any]) -> dict[str, float]:
    embedded, cluster = modes.get("embedded", {}), modes.get("cluster", {})
    found = {}
    if "latency" in embedded and "latency" in cluster:
        found["first_stage_latency_warm"] = cluster["latency"]["warm"]["median"] / embedded["latency"]["warm"]["median"]
    if "overhead" in embedded and "overhead" in cluster:
        found["overhead_per_stage"] = (cluster["overhead"]["overhead_per_stage_seconds"]["median"]
                                       / embedded["overhead"]["overhead_per_stage_seconds"]["median"])
    if "packing" in embedded and "packing" in cluster:
        found["packing_wall"] = (cluster["packing"]["wall_seconds"]["median"]
                                 / embedded["packing"]["wall_seconds"]["median"])
    return {key: round(value, 3) for key, value in found.items()}


# -------------------------------------------------------------------------------------------- main


def run_mode(mode: Any, sessions: Any, model_dir: Path, args: argparse.Namespace, wanted: set[str],
             loads: dict[str, Any]) -> dict[str, Any]:
    """The wanted measurements, in order, for one mode."""
    entry = {}
    if "latency" in wanted:
        entry["latency"] = measure(f"{mode.name}: first-stage latency", loads, partial(
            first_stage_latency, mode, sessions, model_dir, args.repeats))
    if "overhead" in wanted:
        entry["overhead"] = measure(f"{mode.name}: per-stage overhead", loads, partial(
            per_stage_overhead, mode, sessions, model_dir, args.stages, args.stage_seconds, max(2, args.repeats)))
    if "packing" in wanted:
        runs = [measure(f"{mode.name}: GPU packing {i + 1}", loads, partial(
            gpu_packing, mode, sessions, model_dir, args.jobs, args.parallel_seconds, args.gpus))
            for i in range(args.packing_runs)]
        entry["packing"] = {"runs": runs, "speedup": summary([r["speedup"] for r in runs]),
                            "speedup_over_stage_span": summary([r["speedup_over_stage_span"] for r in runs]),
                            "wall_seconds": summary([r["wall_seconds"] for r in runs]), "goal_speedup": 3.5}
        if args.serial:
            serial = measure(f"{mode.name}: the same jobs serially", loads, partial(
                serial_wall, mode, sessions, model_dir, args.jobs, args.parallel_seconds))
            entry["packing"]["serial"] = serial
            entry["packing"]["speedup_over_serial_wall"] = summary(
                [serial["wall_seconds"] / r["wall_seconds"] for r in runs])
    return entry


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="cluster,embedded", help="Comma-separated, run in this order.")
    parser.add_argument("--measure", default="latency,overhead,packing", help="Comma-separated measurements.")
    parser.add_argument("--repeats", type=int, default=3, help="Warm latency jobs; overhead jobs (at least 2).")
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--stage-seconds", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--parallel-seconds", type=float, default=20.0)
    parser.add_argument("--packing-runs", type=int, default=2, help="Times the GPU packing is measured.")
    parser.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run the packing jobs one after another, for the measured serial wall time.")
    parser.add_argument("--gpus", type=int, default=4, help="Logical GPUs of the Ray head.")
    parser.add_argument("--cpus", type=int, default=8, help="Logical CPUs of the Ray head.")
    parser.add_argument("--extra-workers", type=int, default=2, help="Workers started besides up's two.")
    parser.add_argument("--extra-limit", type=int, default=3, help="Slots of each extra worker.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds each cluster part may take to start.")
    parser.add_argument("--runner-lost-after", type=float, default=600.0,
                        help="SPARSEFLOW_RUNNER_LOST_AFTER_S of the cluster.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sf-bench-cluster-"))
    # Prefect's ephemeral server for the embedded runs: our own home, set before Prefect is imported. Its
    # default 20 s startup bound is not enough on a loaded machine (the first job then fails to start), and
    # its telemetry writes clash with the flows' on its SQLite file.
    os.environ["PREFECT_HOME"] = str(scratch / "embedded-prefect")
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The reconciler judges a started flow run lost when the job's heartbeat is older than this; the heartbeat
    # is the API's from dispatch until the flow's body runs, and a loaded 2-core machine takes minutes to
    # start a flow-run process (default 30 s: runs were failed as they began). The cluster inherits it.
    os.environ["SPARSEFLOW_RUNNER_LOST_AFTER_S"] = str(args.runner_lost_after)
    ray_token_auth(scratch)
    try:
        run(args, scratch)
    except BaseException:
        print(f"failed; logs kept under {scratch}", file=sys.stderr)
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> None:
    """Start the cluster, measure each mode, stop the cluster, write the results."""
    modes, wanted = args.modes.split(","), set(args.measure.split(","))
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": machine(), "load_average": {"start": load_average()},
                               "settings": vars(args) | {"out": str(args.out)}, "modes": {}}
    loads: dict[str, Any] = {}
    model_dir = build_tiny_model(scratch / "tiny-model")
    slots = 2 + args.extra_workers * args.extra_limit
    with local_cluster(scratch / "cluster-home", args.gpus, args.cpus, args.extra_workers, args.extra_limit,
                       args.timeout) as state:
        use_cluster_clients(state)
        from prefect.settings import PREFECT_WORKER_QUERY_SECONDS

        from orchestrator.settings import Settings

        results["cluster"] = {"worker_slots": slots, "ray": f"{args.gpus} logical GPUs, {args.cpus} CPUs",
                              "store": "PostgreSQL", "artifact_root": "s3 (moto)",
                              "prefect_worker_query_seconds": PREFECT_WORKER_QUERY_SECONDS.value()}
        embedded_settings = Settings(home=scratch / "embedded-home", database_url=state.env["SPARSEFLOW_DATABASE_URL"],
                                     artifact_root=state.env["SPARSEFLOW_ARTIFACT_ROOT"],
                                     ray_address=state.env["SPARSEFLOW_RAY_ADDRESS"], max_concurrent_jobs=args.jobs)
        embedded = EmbeddedMode(embedded_settings)
        sessions = embedded.orchestrator.sessions
        runners = {"embedded": embedded, "cluster": ClusterMode(state.urls["api"])}
        try:
            for name in modes:
                results["modes"][name] = run_mode(runners[name], sessions, model_dir, args, wanted, loads)
        finally:
            for runner in runners.values():
                runner.close()
            import ray

            ray.shutdown()  # this process joined the cluster's Ray for the embedded runs; leave before it stops
    results["ratios"] = ratios(results["modes"])
    results["load_average"].update(loads, end=load_average())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
