"""How long `sparseflow jobs`, `status` and `download` take on the embedded store, run as a user runs them.

Seeds a fresh `SPARSEFLOW_HOME` (SQLite) with `--jobs` finished jobs of five stages, each with a few
dozen metrics and a note, and one model artifact of `--artifact-mib` stored through the real
`ArtifactStorage`; then runs each command as its own process (the installed `sparseflow` console script,
stdout piped), `--repeats` times after one unmeasured run, and reports the median, min and max wall time.
The download writes into a fresh folder each time, so it always hashes and installs the whole artifact.
Goal (issue: outputs and CPU path): each answers within 1 s.

Results go to bench/results/cli_latency.json (machine, load averages, versions, the command).

    .venv/bin/python bench/cli_latency.py
    .venv/bin/python bench/cli_latency.py --jobs 50 --repeats 3 --out /tmp/cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seed(home: Path, jobs: int, artifact_mib: int) -> tuple[str, str]:
    """(a job id, an artifact id) in a store of `jobs` finished jobs under `home`."""
    from orchestrator.runtime import JobRuntime
    from orchestrator.settings import Settings
    from orchestrator.states import Status
    from orchestrator.store import queries
    from workers.storage import ArtifactStorage

    settings = Settings(home=home)
    sessions = JobRuntime.from_settings(settings).sessions  # folders made, store migrated
    kinds = ("calibrate", "prune", "finetune", "evaluate", "kernel_tune")
    job_id = ""
    with sessions.begin() as session:
        for number in range(jobs):
            job = queries.create_job(session, name=f"seeded-{number}", recipe={"name": f"seeded-{number}"},
                                     stages=[(kind, {}) for kind in kinds], code_version="bench",
                                     package_versions={}, owner="local")
            queries.set_job_status(session, job.id, Status.running)
            for run in job.stage_runs:
                queries.set_stage_status(session, run.id, Status.running)
                points = [(f"sparsity.layer.{i}", 0.5, 0) for i in range(30)] + [("stage_seconds", 12.5, 0)]
                queries.add_metrics(session, job_id=job.id, stage_run_id=run.id, metrics=points)
                queries.set_stage_status(session, run.id, Status.succeeded)
            queries.add_tag(session, job_id=job.id, key="note", value="seeded for the CLI bench")
            queries.set_job_status(session, job.id, Status.succeeded)
            job_id = job.id
        model = home / "scratch" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"hidden_size": 8}')
        (model / "model.safetensors").write_bytes(os.urandom(artifact_mib << 20))
        storage = ArtifactStorage(settings.artifacts_url, settings.cache_dir / "artifacts")
        last = queries.get_job(session, job_id)
        stored = storage.put(model, job_id=job_id, label="01-prune", kind="model")
        artifact = queries.add_artifact(session, job_id=job_id, kind="model", uri=stored.uri, sha256=stored.sha256,
                                        size_bytes=stored.size_bytes, stage_run_id=last.stage_runs[1].id)
        return job_id, artifact.id


def timed(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--artifact-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cli_latency.json")
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("sparseflow"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sparseflow-cli-bench-") as scratch:
        home = Path(scratch) / "home"
        job_id, artifact_id = seed(home, args.jobs, args.artifact_mib)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEFLOW_")}
        env.update(SPARSEFLOW_HOME=str(home), COLUMNS="160")
        commands = {
            "sparseflow --help": [cli, "--help"],
            "sparseflow jobs": [cli, "jobs"],
            "sparseflow status JOB": [cli, "status", job_id],
            f"sparseflow download ARTIFACT ({args.artifact_mib} MiB)": [cli, "download", artifact_id, "-o"],
        }
        for label, command in commands.items():
            values = []
            for attempt in range(args.repeats + 1):
                argv = command + [str(Path(scratch) / f"out-{attempt}")] if command[-1] == "-o" else command
                seconds = timed(argv, env)
                if attempt:  # the first run warms the page cache and the bytecode
                    values.append(round(seconds, 3))
            rows[label] = {"values": values, "median": statistics.median(values), "min": min(values),
                           "max": max(values)}
            print(f"{label:45s} median {rows[label]['median']:.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    report = {
        "benchmark": "cli_latency",
        "command": " ".join(["python", *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {name: metadata.version(name) for name in ("sqlalchemy", "typer", "rich")},
        "settings": {"jobs": args.jobs, "stages_per_job": 5, "artifact_mib": args.artifact_mib,
                     "repeats": args.repeats, "store": "SQLite (embedded)"},
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "goal_seconds": 1.0,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
