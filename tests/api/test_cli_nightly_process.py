"""`sparseflow nightly --now` as a real process: Prefect's server and the local Ray node start before the
night's flows (which run side by side), every pair's job succeeds, and nothing is left running after."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_cli_run import NOISE, REPO, _left_running


def test_a_night_of_parallel_pairs_runs_on_services_started_first(tmp_path: Path) -> None:
    recipes = [{"name": f"nap-{i}", "stages": [{"stage": "sleep", "seconds": 1}]} for i in range(3)]
    zoo = tmp_path / "zoo.yaml"  # one model, three recipes: three jobs whose flows start together
    zoo.write_text(yaml.safe_dump({"name": "proc-zoo", "recipes": recipes, "models": ["builtin:smollm2-135m"]}))
    home = tmp_path / "home"
    env = {**os.environ, "SPARSEFLOW_HOME": str(home), "COLUMNS": "250"}
    for key in ("SPARSEFLOW_URL", "PREFECT_API_URL", "SPARSEFLOW_PREFECT_API_URL", "SPARSEFLOW_RAY_ADDRESS"):
        env.pop(key, None)
    night = subprocess.run([sys.executable, "-m", "api.cli", "nightly", str(zoo), "--now"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    output = night.stdout + night.stderr
    assert night.returncode == 0, output[-4000:]
    assert output.count(" succeeded") >= 3 and ": succeeded" in output, output[-4000:]
    assert not [n for n in NOISE if n in output], output[-3000:]

    deadline = time.monotonic() + 30
    while _left_running(home) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _left_running(home)
