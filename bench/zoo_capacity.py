"""Capacity of a night: a simulated zoo of many tiny models sharing a local Ray's logical GPUs.

The zoo has `--models` models, each a distinct tiny random Llama (its own seed, so its own content and
cache keys), and one recipe of stand-in stages: a CPU stage of `--cpu-seconds` (`num_cpus: 0.25`), then a
GPU stage of `--gpu-seconds` (`num_gpus: 1`), both `sleep` stages (pipelines/stages/sleep.py) that hold
their Ray resources for exactly that long and record when (a `marker` artifact). One night runs through
the real path (`orchestrator.nights.run_night`: every pair its own job, all handed to the embedded
orchestrator at once, `--concurrent` jobs at a time, SQLite store, local Ray with `--gpus` logical GPUs).

Reported (bench/results/zoo_capacity.json, and a plot of the GPUs busy over time, zoo_capacity.png):

- the night's wall time (night started -> finished) against the ideal, total GPU work / GPUs
  (goal: within 15%), and against the serial sum of every stage's time;
- GPUs busy over time, from the GPU stages' markers: the most at once (at most `--gpus`), the mean over
  the night, and overlapping GPU sleeps given the same GPU (must be 0);
- per-job orchestration overhead: job wall (started -> finished) minus its stages' own time minus the time
  its GPU stage waited for a free GPU (marked running -> its sleep began);
- then a second night of the same zoo: every pair unchanged, so every job is reused from the stage cache;
  its wall time.

    .venv/bin/python bench/zoo_capacity.py                  # 50 models, 4 GPUs, 10 s GPU + 1 s CPU each
    .venv/bin/python bench/zoo_capacity.py --models 8 --gpu-seconds 2 --out /tmp/zoo.json
    .venv/bin/python bench/zoo_capacity.py --prefect up --out bench/results/zoo_capacity_prefect_up.json

A night fired by a served schedule (`sparseflow nightly ZOO`) finds Prefect's server up: `--prefect up`
measures that night. The default, `ephemeral`, also counts Prefect's first start on a new home (it creates
its database) inside the first night.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULTS = ROOT / "bench" / "results" / "zoo_capacity.json"


def _ts(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()


def build_zoo(directory: Path, models: int, cpu_s: float, gpu_s: float) -> Path:
    """`models` distinct tiny models and a zoo file applying the stand-in recipe to each."""
    from tiny_models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    entries = []
    for index in range(models):
        model_dir = directory / f"model-{index:03d}"
        build_tiny_model(len(tokenizer), seed=index).save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        entries.append(str(model_dir))
    recipe = {"name": "stand-in", "max_resumes": 0, "stages": [
        {"stage": "sleep", "seconds": cpu_s, "resources": {"num_cpus": 0.25}},
        {"stage": "sleep", "seconds": gpu_s, "resources": {"num_gpus": 1, "num_cpus": 0.25}},
    ]}
    zoo = directory / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"name": "capacity", "recipes": [recipe], "models": entries}))
    return zoo


def _marker(uri: str) -> dict[str, Any]:
    import fsspec

    with fsspec.open(uri, "rb") as handle:
        return json.loads(handle.read())


def night_timings(sessions: Any, night_id: str) -> dict[str, Any]:
    """Per job: created/started/finished, each stage's own seconds, and the GPU stage's sleep interval."""
    from orchestrator.store import queries
    from orchestrator.store import zoo as zoo_store

    jobs = []
    with sessions() as session:
        night = zoo_store.get_night(session, night_id)
        for row in zoo_store.night_jobs(session, night_id):
            job = row.job
            runs = queries.stage_runs(session, job.id)
            own = sum(m.value for m in queries.job_metrics(session, job.id, name="stage_seconds"))
            gpu_run = runs[-1]
            markers = {a.stage_run_id: _marker(a.uri) for a in queries.list_artifacts(session, job.id, kind="marker")}
            slept = markers.get(gpu_run.id)
            jobs.append({
                "job_id": job.id, "status": job.status.value, "reused": row.reused,
                "started": _ts(job.started_at) if job.started_at else None,
                "finished": _ts(job.finished_at) if job.finished_at else None, "own_seconds": own,
                "gpu_marked_running": _ts(gpu_run.started_at) if gpu_run.started_at else None,
                "gpu_slept": (datetime.fromisoformat(slept["started_at"]).timestamp(),
                              datetime.fromisoformat(slept["finished_at"]).timestamp()) if slept else None,
                "gpu_ids": (slept or {}).get("cuda_visible_devices"),
                "stage_pids": [markers[run.id]["pid"] for run in runs if run.id in markers],
            })
        span = (_ts(night.started_at), _ts(night.finished_at))
    return {"span": span, "jobs": jobs}


def busy_over_time(intervals: list[tuple[float, float]], start: float) -> list[tuple[float, int]]:
    """(seconds since `start`, GPUs busy from then on) at every change."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    steps, busy = [(0.0, 0)], 0
    for moment, change in events:
        busy += change
        steps.append((moment - start, busy))
    return steps


def plot_busy(steps: list[tuple[float, int]], gpus: int, out: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3), dpi=100)
    axes = figure.add_subplot()
    axes.step([t for t, _ in steps], [b for _, b in steps], where="post")
    axes.axhline(gpus, linestyle="--", linewidth=1, color="grey")
    axes.set_xlabel("seconds into the night")
    axes.set_ylabel("GPUs busy")
    axes.set_title("GPU stages running over the night (from their markers)")
    axes.set_ylim(0, gpus + 0.5)
    figure.tight_layout()
    figure.savefig(out)


def summarize(timings: dict[str, Any], gpus: int, cpu_s: float, gpu_s: float) -> dict[str, Any]:
    """The night's figures; GPU use and overheads from the jobs that ran (a reused job's markers and stage
    times are those of the night it was computed)."""
    everything = timings["jobs"]
    jobs = [j for j in everything if not j["reused"]]
    start, end = timings["span"]
    wall = end - start
    slept = [j["gpu_slept"] for j in jobs if j["gpu_slept"]]
    ideal = len(slept) * gpu_s / gpus  # the GPU work done: jobs that ran their GPU stage
    steps = busy_over_time(slept, start)
    busy_seconds = sum(b - a for a, b in slept)
    overheads = [j["finished"] - j["started"] - j["own_seconds"] - max(0.0, j["gpu_slept"][0] - j["gpu_marked_running"])
                 for j in jobs if j["gpu_slept"] and j["started"] and j["finished"] and j["gpu_marked_running"]]
    placed = [(j["gpu_slept"], set((j["gpu_ids"] or "").split(",")) - {""}) for j in jobs if j["gpu_slept"]]
    shared = sum(1 for i, (a, ga) in enumerate(placed) for b, gb in placed[i + 1:]
                 if ga & gb and a[0] < b[1] and b[0] < a[1])
    return {
        "jobs": len(everything), "succeeded": sum(j["status"] == "succeeded" for j in everything),
        "gpu_sleeps_sharing_a_gpu": shared,
        "reused": len(everything) - len(jobs),
        "wall_seconds": round(wall, 3), "ideal_seconds": round(ideal, 3),
        "wall_over_ideal": round(wall / ideal, 3) if ideal else None, "goal_wall_over_ideal": 1.15,
        "serial_sum_seconds": len(jobs) * (cpu_s + gpu_s),
        "speedup_over_serial_sum": round(len(jobs) * (cpu_s + gpu_s) / wall, 3) if jobs else None,
        "max_gpus_busy": max((b for _, b in steps), default=0),
        # Ray worker processes the stages ran in: fewer than stages means workers were reused
        "stages_run": sum(len(j["stage_pids"]) for j in jobs),
        "worker_processes": len({pid for j in jobs for pid in j["stage_pids"]}),
        "mean_gpus_busy": round(busy_seconds / wall, 3) if wall else None,
        "per_job_overhead_seconds": {"median": round(statistics.median(overheads), 3), "max": round(max(overheads), 3),
                                     "min": round(min(overheads), 3)} if overheads else None,
        "busy_steps": [(round(t, 3), b) for t, b in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=4, help="Logical GPUs of the local Ray.")
    parser.add_argument("--cpus", type=int, default=4, help="Logical CPUs of the local Ray.")
    parser.add_argument("--concurrent", type=int, default=8, help="Jobs the embedded orchestrator runs at once.")
    parser.add_argument("--cpu-seconds", type=float, default=1.0)
    parser.add_argument("--gpu-seconds", type=float, default=10.0)
    parser.add_argument("--prefect", choices=("ephemeral", "up"), default="ephemeral",
                        help="ephemeral: Prefect starts its temporary server during the first night (a new "
                        "PREFECT_HOME, so it also creates its database); up: a Prefect server is started and "
                        "answering before the first night, as it is for a schedule served by `sparseflow "
                        "nightly ZOO` (the local Ray node is started by the night in both)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="sparseflow-zoo-capacity-"))
    os.environ.setdefault("PREFECT_HOME", str(scratch / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # as `sparseflow` sets it: Prefect gives its temporary server 20 s by default, which a night's first
    # jobs on a busy 2-core machine can miss (the job then fails before its first stage)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    server = None
    if args.prefect == "up":  # before anything imports Prefect, which reads PREFECT_API_URL once
        from api.prefect_server import PrefectServer

        server = PrefectServer().start()
        print(f"Prefect server up in {server.wait_ready(180):.1f} s", flush=True)

    from orchestrator.lifecycle import code_version, package_versions
    from orchestrator.nights import run_night
    from orchestrator.service import Orchestrator
    from orchestrator.settings import Settings
    from orchestrator.zoo_file import load_zoo

    zoo = load_zoo(build_zoo(scratch, args.models, args.cpu_seconds, args.gpu_seconds))
    settings = Settings(home=scratch / "home", database_url=None, artifact_root=None, ray_address=None,
                        ray_num_cpus=args.cpus, ray_num_gpus=args.gpus, max_concurrent_jobs=args.concurrent)
    orchestrator = Orchestrator(settings)
    nights = []
    try:
        for label in ("first night", "second night (unchanged)"):
            loads = os.getloadavg()
            started = time.monotonic()
            outcome = run_night(zoo, orchestrator)
            print(f"{label}: {outcome.status} in {time.monotonic() - started:.1f} s", flush=True)
            entry = summarize(night_timings(orchestrator.sessions, outcome.night_id), args.gpus,
                              args.cpu_seconds, args.gpu_seconds)
            entry.update(label=label, night_id=outcome.night_id, status=outcome.status,
                         load_average={"before": [round(x, 2) for x in loads],
                                       "after": [round(x, 2) for x in os.getloadavg()]})
            nights.append(entry)
    finally:
        orchestrator.close()
        if server is not None:
            server.stop()
    first, second = nights
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot = args.out.with_suffix(".png")
    plot_busy(first.pop("busy_steps"), args.gpus, plot)
    second.pop("busy_steps")
    result = {
        "command": "python " + " ".join(sys.argv), "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "code_version": code_version(), "packages": package_versions()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "first_night": first, "second_night": second, "plot": plot.name,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in first.items() if k != "label"}, indent=1))
    print(f"second night: {second['reused']}/{second['jobs']} reused, wall {second['wall_seconds']} s")
    print(f"wrote {args.out} and {plot}")


if __name__ == "__main__":
    main()
