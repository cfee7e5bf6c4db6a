"""`sparseflow jobs`, `status` and `download` on the embedded store: read directly, without the service stack.

Jobs, stage runs, tags and artifacts are recorded through `queries` and the real `ArtifactStorage`; no job
runs. The CLI is run as a real process where imports are the point (what a listing loads), in-process
otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app
from orchestrator.settings import Settings
from orchestrator.store import db, queries
from orchestrator.store.models import Artifact
from workers.storage import ArtifactStorage

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "prefect", "transformers", "fastapi", "alembic", "httpx")


def _sessions(settings: Settings) -> Any:
    settings.ensure_dirs()
    engine = db.make_engine(settings.database)
    db.migrate(engine)
    return db.session_factory(engine)


def _job(session: Any, name: str, owner: str = "local", stages: int = 1) -> Any:
    job = queries.create_job(session, name=name, recipe={}, stages=[("sleep", {})] * stages, code_version="t",
                             package_versions={}, owner=owner)
    return job


def _finish(session: Any, job: Any, seconds: list[float]) -> None:
    from orchestrator.states import Status

    queries.set_job_status(session, job.id, Status.running)
    for run, value in zip(job.stage_runs, seconds, strict=True):
        queries.set_stage_status(session, run.id, Status.running)
        queries.add_metrics(session, job_id=job.id, stage_run_id=run.id, metrics=[("stage_seconds", value, 0)])
        queries.set_stage_status(session, run.id, Status.succeeded)
    queries.set_job_status(session, job.id, Status.succeeded)


def _run_cli(home: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARSEFLOW_HOME": str(home), "COLUMNS": "200"}
    env.pop("SPARSEFLOW_URL", None)
    script = code or "import sys; from api.cli import main; sys.argv = ['sparseflow', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_jobs_listing_imports_no_service_stack(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with _sessions(Settings(home=home)).begin() as session:
        job_id = _job(session, "listed").id
    probe = ("import sys; from api.cli import main; sys.argv = ['sparseflow', 'jobs']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = _run_cli(home, code=probe)
    assert result.returncode == 0, result.stderr
    assert job_id in result.stdout and "listed" in result.stdout
    assert "LOADED []" in result.stdout, result.stdout.splitlines()[-1]


def test_a_refusal_from_the_store_is_one_line_on_stderr(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _sessions(Settings(home=home))
    env_tokens = {"SPARSEFLOW_API_TOKENS": json.dumps({"ta": "alice"})}
    script = "import sys; from api.cli import main; sys.argv = ['sparseflow', *sys.argv[1:]]; main()"
    result = subprocess.run([sys.executable, "-c", script, "jobs"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "SPARSEFLOW_HOME": str(home), **env_tokens}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: missing or unknown bearer token"


def test_jobs_on_a_store_not_created_yet_lists_nothing_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "never"
    result = _run_cli(home, "jobs")
    assert result.returncode == 0, result.stderr
    assert "jobs" in result.stdout
    assert not (home / "sparseflow.db").exists()


def test_jobs_and_status_show_only_the_owners_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    with _sessions(Settings(home=home)).begin() as session:
        mine, theirs = _job(session, "mine", owner="alice").id, _job(session, "theirs", owner="bob").id
    monkeypatch.setenv("SPARSEFLOW_HOME", str(home))
    monkeypatch.setenv("SPARSEFLOW_API_TOKENS", json.dumps({"ta": "alice", "tb": "bob"}))
    monkeypatch.delenv("SPARSEFLOW_URL", raising=False)
    from orchestrator.settings import get_settings

    get_settings.cache_clear()
    try:
        listing = CliRunner().invoke(app, ["jobs", "--token", "ta"], env={"COLUMNS": "200"})
        assert listing.exit_code == 0, listing.output
        assert mine in listing.output and theirs not in listing.output
        other = CliRunner().invoke(app, ["status", theirs, "--token", "ta"])
        assert other.exit_code != 0 and "not found" in str(other.exception)
        anonymous = CliRunner().invoke(app, ["jobs"])
        assert anonymous.exit_code != 0 and "bearer token" in str(anonymous.exception)
    finally:
        get_settings.cache_clear()


def test_status_names_the_job_a_cache_hit_reused_instead_of_its_seconds(cli_home: Path) -> None:
    settings = Settings(home=cli_home)
    with _sessions(settings).begin() as session:
        first = _job(session, "first", stages=2)
        _finish(session, first, [41.5, 7.25])
        second = _job(session, "second", stages=2)
        _finish(session, second, [41.5, 3.0])  # stage 0 copied stage_seconds from the first job's run
        queries.add_tag(session, job_id=second.id, stage_run_id=second.stage_runs[0].id, key="cached_from",
                        value=first.stage_runs[0].id)
        third = _job(session, "third", stages=1)  # a hit on a hit: the job that really ran it is named
        _finish(session, third, [41.5])
        queries.add_tag(session, job_id=third.id, stage_run_id=third.stage_runs[0].id, key="cached_from",
                        value=second.stage_runs[0].id)
        ids = first.id, second.id, third.id
    result = CliRunner().invoke(app, ["status", ids[1]], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert f"reused from job {ids[0]}" in result.output
    assert "41.5" not in result.output and "3.0" in result.output
    chained = CliRunner().invoke(app, ["status", ids[2]], env={"COLUMNS": "250"})
    assert f"reused from job {ids[0]}" in chained.output and "41.5" not in chained.output
    ran = CliRunner().invoke(app, ["status", ids[0]], env={"COLUMNS": "250"})
    assert "41.5" in ran.output and "reused" not in ran.output


def _stored(settings: Settings, tmp_path: Path) -> tuple[str, str]:
    model = tmp_path / "scratch" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "weights.bin").write_bytes(bytes(range(256)) * 33)
    storage = ArtifactStorage(settings.artifacts_url, settings.cache_dir / "artifacts")
    with _sessions(settings).begin() as session:
        job = _job(session, "downloads")
        stored = storage.put(model, job_id=job.id, label="00-sleep", kind="model")
        row = queries.add_artifact(session, job_id=job.id, kind="model", uri=stored.uri, sha256=stored.sha256,
                                   size_bytes=stored.size_bytes, stage_run_id=job.stage_runs[0].id)
        return row.id, row.uri


def test_download_from_the_store_verifies_and_installs_a_directory(cli_home: Path, tmp_path: Path) -> None:
    artifact_id, _ = _stored(Settings(home=cli_home), tmp_path)
    result = CliRunner().invoke(app, ["download", artifact_id, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    got = tmp_path / "out" / "model"
    assert (got / "config.json").read_text() == '{"hidden_size": 8}'
    assert hashlib.sha256((got / "weights.bin").read_bytes()).digest() == \
        hashlib.sha256(bytes(range(256)) * 33).digest()
    again = CliRunner().invoke(app, ["download", artifact_id, "-o", str(tmp_path / "out")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_download_from_the_store_refuses_tampered_bytes_and_records_it(cli_home: Path, tmp_path: Path) -> None:
    settings = Settings(home=cli_home)
    artifact_id, uri = _stored(settings, tmp_path)
    weights = Path(uri.removeprefix("file://")) / "weights.bin"
    weights.write_bytes(b"\xff" + weights.read_bytes()[1:])
    os.utime(weights, ns=(1, 1))  # another stamp: the fingerprint no longer matches, a full check runs
    result = CliRunner().invoke(app, ["download", artifact_id, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "corrupt" in result.output and not (tmp_path / "out" / "model").exists()
    with _sessions(settings)() as session:
        assert session.get(Artifact, artifact_id).corrupt_reason


def test_download_of_an_unknown_artifact_is_a_clear_error(cli_home: Path, tmp_path: Path) -> None:
    _sessions(Settings(home=cli_home))
    result = CliRunner().invoke(app, ["download", "0" * 32, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "not found" in result.output


def test_local_body_resumes_a_part_only_while_it_names_the_same_bytes(cli_home: Path, tmp_path: Path) -> None:
    from api.local_download import LocalBody

    settings = Settings(home=cli_home)
    artifact_id, _ = _stored(settings, tmp_path)
    with _sessions(settings).begin() as session:
        artifact = session.get(Artifact, artifact_id)
        body = LocalBody.open(session, artifact)
        etag = f'"{artifact.sha256}"'
    with body.stream("GET", "", {}) as whole:
        everything = whole.read()
        assert whole.status_code == 200 and whole.headers["X-Sparseflow-Format"] == "tar"
    with body.stream("GET", "", {"Range": "bytes=1000-", "If-Range": etag}) as rest:
        assert rest.status_code == 206 and rest.read() == everything[1000:]
    with body.stream("GET", "", {"Range": "bytes=1000-", "If-Range": '"other"'}) as changed:
        assert changed.status_code == 200 and changed.read() == everything
    with body.stream("GET", "", {"Range": f"bytes={len(everything)}-", "If-Range": etag}) as past:
        assert past.status_code == 416
