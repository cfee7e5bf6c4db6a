"""The run's own Prefect API server: a server that cannot start is an error carrying its own output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from api.prefect_server import PrefectServer, PrefectServerError
server = PrefectServer().start()
try:
    server.wait_ready(300)
except PrefectServerError as error:
    print("REFUSED", error)
    sys.exit(0)
print("STARTED")
server.stop()
"""


def test_a_prefect_server_that_cannot_open_its_database_fails_loudly_with_its_output(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = {**os.environ, "PREFECT_HOME": str(blocker / "prefect")}  # a path under a file: never creatable
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("REFUSED Prefect's API server exited with status"), result.stdout[-2000:]
    assert "its last output:" in result.stdout


def test_the_server_is_started_before_prefect_is_imported_or_not_at_all() -> None:
    script = ("import prefect\nfrom api.prefect_server import PrefectServer, PrefectServerError\n"
              "try:\n    PrefectServer().start()\nexcept PrefectServerError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "before importing prefect" in result.stdout, result.stdout + result.stderr[-2000:]


def test_resume_of_a_finished_job_is_refused_before_any_service_starts(tmp_path: Path) -> None:
    from orchestrator.runtime import JobRuntime
    from orchestrator.settings import Settings
    from orchestrator.states import Status
    from orchestrator.store import queries

    home = tmp_path / "home"
    with JobRuntime.from_settings(Settings(home=home)).sessions.begin() as session:
        job = queries.create_job(session, name="done", recipe={}, stages=[("sleep", {})], code_version="t",
                                 package_versions={})
        queries.set_job_status(session, job.id, Status.running)
        queries.set_job_status(session, job.id, Status.succeeded)
        job_id = job.id
    script = "import sys; from api.cli import main; sys.argv = ['sparseflow', *sys.argv[1:]]; main()"
    env = {**os.environ, "SPARSEFLOW_HOME": str(home)}
    for key in ("SPARSEFLOW_URL", "PREFECT_API_URL"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", script, "resume", job_id], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: job {job_id}: cannot move from 'succeeded' to 'queued'; " \
                                    "allowed from 'succeeded': none (final)"
    assert not (home / "prefect" / "prefect.db").exists()  # Prefect's server never got to its database
