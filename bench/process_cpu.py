"""Where a machine's CPU time goes while a command runs: CPU seconds summed by kind of process.

The service's start-up costs on a small machine are spread over many short-lived processes (Prefect's
flow-run processes, Ray's worker processes, Prefect's server and workers, PostgreSQL), which a profiler
of one process does not see. This runs a command, samples every process on the machine every
`--interval` seconds (psutil: user + system CPU seconds, keyed by pid and start time, so a reused pid is
another process), and attributes what each process used while the command ran to a kind read off its
command line. A process that lives less than one interval is missed; one that was running before the
command counts only what it used after.

    .venv/bin/python bench/process_cpu.py --out bench/results/process_cpu_packing.json -- \
        .venv/bin/python bench/cluster_overhead.py --modes cluster --measure packing --packing-runs 1 \
        --no-serial --out /tmp/packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import psutil

# (kind, any of these in the command line); the first match wins, so the specific ones come first
KINDS = [
    ("ray helpers (dashboard, monitor, agents)", ("ray/dashboard/", "ray/autoscaler/", "log_monitor.py",
                                                  "runtime_env/agent", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
                                                  "bin/ray start")),
    ("ray workers", ("ray::", "default_worker.py")),
    ("prefect flow-run processes", ("-m prefect.engine", "prefect.flow_engine")),
    ("prefect workers", ("worker start", "api.cli worker", "sparseflow worker")),
    ("prefect server", ("server start", "prefect.server")),
    ("sparseflow api", ("api.cli serve", "sparseflow serve")),
    ("postgres", ("postgres",)),
    ("s3 stand-in (moto)", ("moto_server",)),
]
RAY_CORE = {"gcs_server", "raylet"}


def kind_of(argv: list[str], name: str) -> str:
    if argv and os.path.basename(argv[0]) in RAY_CORE or name in RAY_CORE:
        return "ray core (gcs_server, raylet)"
    command = " ".join(argv)
    for kind, marks in KINDS:
        if any(mark in command for mark in marks):
            return kind
    return "other"


class Sampler:
    """CPU seconds per process since the sampler started, refreshed by `sample()`."""

    def __init__(self) -> None:
        self.started = time.time()
        self.me = os.getpid()
        self.command_pid = -1
        self.seen: dict[tuple[int, float], dict] = {}

    def sample(self) -> None:
        for process in psutil.process_iter(["pid", "create_time", "cmdline", "name", "cpu_times"]):
            info = process.info
            if info["pid"] == self.me or info["cpu_times"] is None:
                continue
            used = info["cpu_times"].user + info["cpu_times"].system
            key = (info["pid"], info["create_time"])
            entry = self.seen.get(key)
            if entry is None:
                before = used if info["create_time"] < self.started else 0.0
                entry = self.seen[key] = {"kind": "other", "command": "", "base": before}
            if entry["kind"] == "other":  # a process seen between fork and exec reads as its parent or blank
                argv = info["cmdline"] or []
                entry["command"] = (" ".join(argv) or info["name"] or "?")[:160]
                entry["kind"] = "the command itself" if info["pid"] == self.command_pid else \
                    kind_of(argv, info["name"] or "")
            entry["used"] = used - entry["base"]

    def totals(self) -> dict[str, dict]:
        by_kind: dict[str, dict] = defaultdict(lambda: {"cpu_seconds": 0.0, "processes": 0, "examples": []})
        for entry in self.seen.values():
            if entry.get("used", 0.0) < 0.05:
                continue
            row = by_kind[entry["kind"]]
            row["cpu_seconds"] += entry["used"]
            row["processes"] += 1
            if len(row["examples"]) < 3 and entry["command"] not in row["examples"]:
                row["examples"].append(entry["command"])
        ordered = sorted(by_kind.items(), key=lambda item: -item[1]["cpu_seconds"])
        return {kind: {**row, "cpu_seconds": round(row["cpu_seconds"], 1)} for kind, row in ordered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sampler = Sampler()
    loads = os.getloadavg()
    child = subprocess.Popen(command)
    sampler.command_pid = child.pid
    while child.poll() is None:
        sampler.sample()
        time.sleep(args.interval)
    sampler.sample()
    wall = time.time() - sampler.started
    totals = sampler.totals()
    result = {
        "command": "python bench/process_cpu.py " + " ".join(sys.argv[1:]),
        "started": datetime.fromtimestamp(sampler.started, UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "load_before": [round(x, 2) for x in loads], "load_after": [round(x, 2) for x in os.getloadavg()],
        "returncode": child.returncode, "wall_seconds": round(wall, 1),
        "cpu_seconds_total": round(sum(row["cpu_seconds"] for row in totals.values()), 1),
        "by_kind": totals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'kind':<42} {'cpu s':>7} {'procs':>6}")
    for kind, row in totals.items():
        print(f"{kind:<42} {row['cpu_seconds']:>7.1f} {row['processes']:>6}")
    print(f"total {result['cpu_seconds_total']} CPU s over {result['wall_seconds']} s wall "
          f"({os.cpu_count()} CPUs); wrote {args.out}")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
