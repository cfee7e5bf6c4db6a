"""What `sparseflow run` costs beyond its stages' own time, in embedded mode (SQLite, local Ray, Prefect).

Runs `sparseflow run` as a user does (its own process, stdout piped) on a recipe of stand-in `sleep`
stages with the cache off, `--repeats` times in one fresh `SPARSEFLOW_HOME` after one unmeasured warm-up
run (it converts and hashes the built-in model once, migrates the new store and Prefect's database).
For each run:

    overhead = wall time of the process - sum of its stages' `stage_seconds` (read from the store)

and where it went, from the store's timestamps and the process's own clock:

- `to_job_recorded`: process start to `jobs.created_at` (imports, store, recipe checks);
- `to_flow_running`: to `jobs.started_at` (Prefect's API reached, the flow run created and started);
- `to_first_stage`: to the first stage marked running (the local Ray node started, inputs hashed);
- `between_stages`: the stages' spans minus their own seconds (Ray placement, the worker's start and
  imports, recording the outcome);
- `to_job_finished`: last stage finished to `jobs.finished_at`;
- `to_exit`: `jobs.finished_at` to the process's exit (the summary, Ray and Prefect shut down).

By default the runs use the embedded default of keeping Prefect's server and the Ray node up between
runs (`api.kept_services`): the warm-up run starts the keeper and the measured runs join it; the keeper
is stopped at the end. `--keep-services-s 0` measures runs that each start and stop their own.
`--running-prefect` gives the runs the address of a Prefect server started beforehand (untimed), which
is what a user with a Prefect server already up gets: the run then starts none of its own.
`--running-ray` does the same for Ray: a `ray start --head` node on loopback, started beforehand
(untimed) and given to the runs as `SPARSEFLOW_RAY_ADDRESS`; the runs join it instead of starting one.

Results go to bench/results/run_overhead.json (machine, load averages before and after, versions, the
command, every run and the medians); a table is printed.

    .venv/bin/python bench/run_overhead.py
    .venv/bin/python bench/run_overhead.py --stages 2 --stage-seconds 2 --repeats 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = ("to_job_recorded", "to_flow_running", "to_first_stage", "between_stages", "to_job_finished", "to_exit")


def _recipe(path: Path, stages: int, seconds: float) -> None:
    lines = ["name: run-overhead", "reuse_cached: false", "stages:"]
    lines += [f"  - stage: sleep\n    seconds: {seconds:g}" for _ in range(stages)]
    path.write_text("\n".join(lines) + "\n")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(), **{name: version(name) for name in
                                                     ("prefect", "ray", "sqlalchemy", "torch", "rich")}}


def _timestamps(home: Path, job_id: str) -> dict[str, Any]:
    """The job's and its stages' times and stage seconds, read from the store the run wrote."""
    from orchestrator.settings import Settings
    from orchestrator.store import db, queries

    engine = db.make_engine(Settings(home=home).database)
    with db.session_factory(engine)() as session:
        job = queries.get_job(session, job_id)
        stages = []
        for run in queries.stage_runs(session, job_id):
            seconds = [m.value for m in run.metrics if m.name == "stage_seconds"]
            stages.append({"started_at": run.started_at.timestamp(), "finished_at": run.finished_at.timestamp(),
                           "stage_seconds": seconds[-1] if seconds else 0.0})
        found = {"status": job.status.value, "created_at": job.created_at.timestamp(),
                 "started_at": job.started_at.timestamp(), "finished_at": job.finished_at.timestamp(),
                 "stages": stages}
    engine.dispose()
    return found


def run_once(home: Path, recipe: Path, keep_services_s: float) -> dict[str, Any]:
    # the checkout this file is in, for the CLI and (through PYTHONPATH) for Ray's workers
    env = {**os.environ, "SPARSEFLOW_HOME": str(home), "PYTHONPATH": str(REPO),
           "SPARSEFLOW_KEEP_SERVICES_S": f"{keep_services_s:g}"}
    env.pop("SPARSEFLOW_URL", None)
    command = [sys.executable, "-m", "api.cli", "run", str(recipe)]
    began = time.time()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    ended = time.time()
    match = re.search(r"^job ([0-9a-f]{32})", result.stdout, re.MULTILINE)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"sparseflow run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    times = _timestamps(home, match.group(1))
    stages = times["stages"]
    own = sum(s["stage_seconds"] for s in stages)
    span = sum(s["finished_at"] - s["started_at"] for s in stages)
    phases = {
        "to_job_recorded": times["created_at"] - began,
        "to_flow_running": times["started_at"] - times["created_at"],
        "to_first_stage": stages[0]["started_at"] - times["started_at"],
        "between_stages": (stages[-1]["finished_at"] - stages[0]["started_at"]) - own,
        "to_job_finished": times["finished_at"] - stages[-1]["finished_at"],
        "to_exit": ended - times["finished_at"],
    }
    return {"job_id": match.group(1), "wall_s": ended - began, "stage_seconds": own, "stage_span_s": span,
            "overhead_s": ended - began - own, "phases_s": phases,
            "output_lines": len(result.stdout.splitlines()), "stderr": result.stderr[-2000:],
            "started_keeper": "stay up for the next run" in result.stdout}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--stage-seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="What this run measures (e.g. the code state).")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "run_overhead.json")
    parser.add_argument("--append", action="store_true", help="Add this run's record to the file's list.")
    parser.add_argument("--running-prefect", action="store_true", help=(
        "Start one Prefect API server before the runs and give them its PREFECT_API_URL (what a user with a "
        "Prefect server already up gets); its start is not timed."))
    parser.add_argument("--running-ray", action="store_true", help=(
        "Start a Ray head (`ray start --head`, loopback) before the runs and give them its address as "
        "SPARSEFLOW_RAY_ADDRESS; its start is not timed."))
    parser.add_argument("--keep-services-s", type=float, default=600.0, help=(
        "SPARSEFLOW_KEEP_SERVICES_S for the runs (0: each run starts and stops its own Prefect server and Ray)."))
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of that Ray head.")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import ray_head

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="run-overhead-") as scratch:
        home, recipe = Path(scratch) / "home", Path(scratch) / "recipe.yaml"
        _recipe(recipe, args.stages, args.stage_seconds)
        server = None
        if args.running_prefect:
            from api.prefect_server import PrefectServer

            os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
            Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
            server = PrefectServer().start()
            server.wait_ready(300)
        head = None
        try:
            if args.running_ray:
                # a head started by `ray start` asks its clients for the token it generated (~/.ray/auth_token)
                os.environ["RAY_AUTH_MODE"] = "token"
                head, os.environ["SPARSEFLOW_RAY_ADDRESS"] = ray_head.start(Path(scratch), args.ray_cpus)
            warmup = run_once(home, recipe, args.keep_services_s)
            runs = [run_once(home, recipe, args.keep_services_s) for _ in range(args.repeats)]
        finally:
            from api.kept_services import ServiceFiles, stop_keeper

            kept = ServiceFiles(home).read()
            if kept is not None:
                stop_keeper(kept)
            if head is not None:
                ray_head.stop(head, grace_s=30)
            if server is not None:
                server.stop()
    record = {
        "label": args.label,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        "command": f"sparseflow run <recipe: {args.stages} sleep stages of {args.stage_seconds:g} s, "
                   f"reuse_cached false> (stdout piped, SPARSEFLOW_KEEP_SERVICES_S={args.keep_services_s:g})"
                   + (", PREFECT_API_URL of a Prefect server already up" if args.running_prefect else "")
                   + (", SPARSEFLOW_RAY_ADDRESS of a Ray head already up" if args.running_ray else ""),
        "bench_command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "keep_services_s": args.keep_services_s,
        "warmup": warmup,
        "runs": runs,
        "median_overhead_s": statistics.median(r["overhead_s"] for r in runs),
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_phases_s": {p: statistics.median(r["phases_s"][p] for r in runs) for p in PHASES},
    }
    records = []
    if args.append and args.out.is_file():
        previous = json.loads(args.out.read_text())
        records = previous if isinstance(previous, list) else [previous]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([*records, record] if args.append else record, indent=1) + "\n")
    print(f"{args.label or 'run'}: load {record['load_before']} -> {record['load_after']}")
    print(f"{'run':>6} {'wall':>7} {'stages':>7} {'overhead':>9}  " + " ".join(f"{p:>15}" for p in PHASES))
    for name, run in [("warmup", warmup), *((str(i), r) for i, r in enumerate(runs))]:
        print(f"{name:>6} {run['wall_s']:7.1f} {run['stage_seconds']:7.1f} {run['overhead_s']:9.1f}  "
              + " ".join(f"{run['phases_s'][p]:15.1f}" for p in PHASES))
    print(f"median overhead {record['median_overhead_s']:.1f} s (wall {record['median_wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
