"""`sparseflow run` as a user runs it with its output piped: a real process, Prefect, Ray and the store.

Two runs of the same one-stage recipe in one home: the first computes the stage, the second is a
stage-cache hit. Checked: progress arrives as plain lines (no bar), no framework noise, the summary
names the job a cache hit reused instead of printing that job's seconds, and the run's Prefect server
and Ray node are gone once it has exited.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
NOISE = ("Token authentication is enabled", "| INFO", "Starting temporary server", "Traceback")


def _run(home: Path, recipe: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARSEFLOW_HOME": str(home), "COLUMNS": "250"}
    for key in ("SPARSEFLOW_URL", "PREFECT_API_URL", "SPARSEFLOW_PREFECT_API_URL", "SPARSEFLOW_RAY_ADDRESS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "api.cli", "run", str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _code_versions(home: Path) -> list[str]:
    with sqlite3.connect(home / "sparseflow.db") as db:
        return [row[0] for row in db.execute("SELECT code_version FROM jobs ORDER BY created_at")]


def _left_running(home: Path) -> list[str]:
    """Processes still running with this home in their environment (the run's Prefect server, Ray)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SPARSEFLOW_HOME") == str(home):
                found.append(f"{process.name()}[{process.pid}]")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_piped_run_prints_plain_progress_no_noise_and_names_a_reused_stages_job(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: piped\nstages:\n  - stage: sleep\n    seconds: 1\n")
    home = tmp_path / "home"
    first = _run(home, recipe)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert not [n for n in NOISE if n in output], output[-3000:]
    assert not re.search(r"━+\s+\d+/\d+", first.stdout)  # no progress bar (bar, done/total) drawn into a pipe
    lines = first.stdout.splitlines()
    job_id = re.search(r"^job ([0-9a-f]{32})", first.stdout, re.MULTILINE).group(1)
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d 00-sleep\s+running", line) for line in lines), lines
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d 00-sleep\s+succeeded in \d+\.\d s", line) for line in lines), lines

    second = _run(home, recipe)
    if "cached" not in second.stdout and _code_versions(home)[-1] != _code_versions(home)[-2]:
        # a commit landed between the runs (the cache keys on the code version): that run computed it
        job_id = re.search(r"^job ([0-9a-f]{32})", second.stdout, re.MULTILINE).group(1)
        second = _run(home, recipe)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "succeeded (cached: same inputs, parameters and code)" in second.stdout
    assert f"reused from job {job_id}" in second.stdout

    deadline = time.monotonic() + 30  # the reaper ends what a run leaves; a clean run leaves nothing
    while _left_running(home) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _left_running(home)
