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
