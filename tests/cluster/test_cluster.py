"""The distributed service for real: `sparseflow up` on this machine, then jobs through its REST API.

One local cluster per module (PostgreSQL databases of their own, a Prefect server on them, a Ray head,
moto's S3 server, two Prefect workers, the API in cluster mode), torn down at the end whatever happens.
The tests run in file order and share it: concurrency (both workers busy), Prefect's view, a worker
SIGKILLed mid-stage (its job resumes on the other worker), the API SIGKILLed mid-job (the job goes on),
and cancel (the stage's Ray task stops within seconds). Jobs use the tiny model and text from conftest.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from api import localcluster
from orchestrator.store import db, queries

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(1500)]

FAST = {"SPARSEFLOW_HEARTBEAT_S": "1", "SPARSEFLOW_RUNNER_LOST_AFTER_S": "20", "SPARSEFLOW_RECONCILE_EVERY_S": "1"}
CANCEL_S = 30  # "within seconds", with room for a loaded 2-core CI machine
JOB_TIMEOUT_S = 900  # generous: a loaded 2-core machine starts each Ray worker (torch import) slowly


def _postgres_up() -> bool:
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], check=False).returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localcluster.ClusterState]:
    if not _postgres_up():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    suffix = uuid.uuid4().hex[:8]
    config = localcluster.ClusterConfig(home=tmp_path_factory.mktemp("cluster"), workers=2, cpus=4,
                                        store_db=f"sf_test_{suffix}", prefect_db=f"sf_prefect_{suffix}")
    saved = {key: os.environ.get(key) for key in FAST}
    os.environ.update(FAST)  # the cluster's processes inherit them
    try:
        state = localcluster.up(config, echo=lambda line: None)
        try:
            yield state
        finally:
            localcluster.down(config.home, echo=lambda line: None)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _drop_databases(config)


def _drop_databases(config: localcluster.ClusterConfig) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        for name in (config.store_db, config.prefect_db):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def api(cluster: localcluster.ClusterState) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.urls["api"], timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def store(cluster: localcluster.ClusterState) -> Iterator[Any]:
    engine = db.make_engine(cluster.env["SPARSEFLOW_DATABASE_URL"])
    yield db.session_factory(engine)
    engine.dispose()


def _recipe(model: Path, text: Path, name: str, *, finetune_steps: int | None = 2) -> dict[str, Any]:
    """calibrate -> prune -> finetune -> evaluate on the tiny model; `finetune_steps` None: the first two only."""
    stages: list[dict[str, Any]] = [
        {"stage": "calibrate", "samples": 4, "seq_len": 32, "batch_size": 2},
        {"stage": "prune", "method": "wanda", "pattern": "2:4"},
    ]
    if finetune_steps is not None:
        stages += [
            {"stage": "finetune", "steps": finetune_steps, "batch_size": 1, "seq_len": 32, "checkpoint_every": 20},
            {"stage": "evaluate", "seq_len": 32, "max_windows": 2, "compare_dense": False},
        ]
    return {"name": name, "model": str(model), "data": {"calibration": str(text), "evaluation": str(text)},
            "stages": stages}


def _submit(api: httpx.Client, recipe: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/jobs", json={"recipe": recipe})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["flow_run_id"], "cluster mode records the Prefect flow run at submission"
    return job


def _job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    for _ in range(30):  # the API may be restarting in one test
        try:
            response = api.get(f"/v1/jobs/{job_id}")
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"the API did not answer for job {job_id}")


def _wait(api: httpx.Client, job_id: str, done: Any, timeout_s: float = JOB_TIMEOUT_S, what: str = "") -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _job(api, job_id)
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {what or 'condition'} not reached in {timeout_s} s: {json.dumps(job)[:2000]}")


def _finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def _finetune_running(job: dict[str, Any]) -> bool:
    finetune = job["stages"][2]
    return finetune["status"] == "running" and finetune["progress_done"] >= 25


def _runner_process(store: Any, job_id: str) -> tuple[int, int]:
    """(flow-run process pid, its parent: the Prefect worker) of the job's latest runner."""
    with store() as session:
        tags = [t.value for t in queries.job_tags(session, job_id) if t.key == "runner_process"]
    host_pid, _, parent = tags[-1].partition(" parent ")
    return int(host_pid.rsplit(":", 1)[1]), int(parent)


def test_three_jobs_at_once_all_succeed_on_both_workers(cluster, api, store, tiny_model_dir, tiny_text_file):
    jobs = [_submit(api, _recipe(tiny_model_dir, tiny_text_file, f"concurrent-{i}", finetune_steps=None))
            for i in range(3)]
    finals = [_wait(api, job["id"], _finished, what="an end") for job in jobs]
    assert [job["status"] for job in finals] == ["succeeded"] * 3, [job["error"] for job in finals]
    workers = {_runner_process(store, job["id"])[1] for job in jobs}
    assert len(workers) == 2, "two workers of one job at a time share three jobs"


def test_each_worker_answers_its_healthcheck(cluster):
    """`sparseflow worker --health-port`: Prefect's /health of each worker, polling its pool, answers 200."""
    ports = [port for name, port in cluster.ports.items() if name.endswith("-health")]
    assert len(ports) == 2
    for port in ports:
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert answer.status_code == 200, answer.text


def test_prefect_lists_the_flow_runs_named_after_their_jobs(cluster, api):
    prefect = Path(sys.executable).parent / "prefect"
    out = subprocess.run([str(prefect), "flow-run", "ls", "--limit", "50"], capture_output=True, text=True,
                         env={**os.environ, **cluster.env, "COLUMNS": "400"}, timeout=120, check=True).stdout
    for job in api.get("/v1/jobs").json()["data"]:
        assert f"{job['name']}-{job['id'][:8]}" in out


def _artifact_bytes_match(uri: str, sha256: str) -> bool:
    """Re-hash an artifact from the cluster's S3 store: a file itself, a folder through its manifest."""
    import fsspec

    from workers.storage import MANIFEST

    fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True)  # not cached: its endpoint dies with the cluster
    if fs.isdir(path):
        manifest_text = fs.cat_file(f"{path}/{MANIFEST}")
        files = json.loads(manifest_text)["files"]
        intact = all(hashlib.sha256(fs.cat_file(f"{path}/{name}")).hexdigest() == digest
                     for name, digest in files.items())
        return intact and hashlib.sha256(manifest_text).hexdigest() == sha256
    return hashlib.sha256(fs.cat_file(path)).hexdigest() == sha256


def test_a_worker_killed_mid_stage_loses_nothing(cluster, api, store, tiny_model_dir, tiny_text_file,
                                                  monkeypatch):
    job = _submit(api, _recipe(tiny_model_dir, tiny_text_file, "worker-killed", finetune_steps=400))
    before = _wait(api, job["id"], _finetune_running, what="finetune running")
    flow_pid, worker_pid = _runner_process(store, job["id"])
    for pid in (worker_pid, flow_pid):  # the pod dies: its worker and the flow run it was running
        os.kill(pid, signal.SIGKILL)

    final = _wait(api, job["id"], _finished, what="an end after the kill")
    assert final["status"] == "succeeded", final["error"]
    assert final["resumes"] == 1
    with store() as session:
        job_notes = [t.value for t in queries.job_tags(session, job["id"]) if t.key == "note"]
        artifacts = queries.list_artifacts(session, job["id"])
        edges = queries.lineage_edges(session, job["id"])
    assert any(n.startswith("worker lost") for n in job_notes), job_notes
    assert _runner_process(store, job["id"])[1] != worker_pid, "resumed on the other worker"
    calibrate, prune, finetune, evaluate = final["stages"]
    for stage, old in ((calibrate, before["stages"][0]), (prune, before["stages"][1])):
        assert stage["attempt"] == 1 and stage["finished_at"] == old["finished_at"], "finished stages not rerun"
    assert finetune["attempt"] == 2 and evaluate["attempt"] == 1
    assert any(n.startswith("resumed from a checkpoint after step") for n in finetune["notes"]), \
        "the retried fine-tune resumes from the checkpoint the dead attempt published"
    # lineage: every stage read and wrote; every stored byte matches its recorded sha256
    for stage in final["stages"]:
        directions = {e.direction for e in edges if e.stage_run_id == stage["id"]}
        assert directions == {"input", "output"}, stage["kind"]
    for key in ("AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, cluster.env[key])
    stored = [a for a in artifacts if a.stage_run_id is not None]
    assert stored and all(_artifact_bytes_match(a.uri, a.sha256) for a in stored)


def _serve(cluster: localcluster.ClusterState, timeout_s: float = 300) -> subprocess.Popen:
    """Start the cluster's API again (same port, same environment) and wait until it answers."""
    log = open(Path(cluster.home) / "cluster" / "logs" / "api-restarted.log", "ab")  # noqa: SIM115
    port = cluster.ports["api"]
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "sparseflow"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **cluster.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{cluster.urls['api']}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"the restarted API did not answer within {timeout_s} s (exit {process.poll()})")


def test_the_api_killed_mid_job_leaves_the_job_running(cluster, api, tiny_model_dir, tiny_text_file):
    job = _submit(api, _recipe(tiny_model_dir, tiny_text_file, "api-killed", finetune_steps=300))
    _wait(api, job["id"], _finetune_running, what="finetune running")
    api_record = next(r for r in cluster.processes if r.name == "api")
    os.kill(api_record.pid, signal.SIGKILL)
    restarted = _serve(cluster)
    try:
        final = _wait(api, job["id"], _finished, what="an end with a restarted API")
        assert final["status"] == "succeeded", final["error"]
        assert final["resumes"] == 0
        assert all(stage["attempt"] == 1 for stage in final["stages"])
    finally:
        os.killpg(restarted.pid, signal.SIGTERM)
        restarted.wait(30)


def _stage_processes(label: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if f"stage:{label}" in text:
            found.append(process)
    return found


def test_cancel_stops_the_running_stage_within_seconds(cluster, tiny_model_dir, tiny_text_file):
    restarted = _serve(cluster)  # the API of the previous test was stopped with it
    with httpx.Client(base_url=cluster.urls["api"], timeout=30) as api:
        try:
            job = _submit(api, _recipe(tiny_model_dir, tiny_text_file, "cancelled", finetune_steps=20000))
            _wait(api, job["id"], _finetune_running, what="finetune running")
            ray_workers = _stage_processes("02-finetune")
            assert ray_workers, "the stage runs as a Ray task named after its label"
            started = time.monotonic()
            assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
            final = _wait(api, job["id"], lambda j: j["stages"][2]["status"] == "cancelled", timeout_s=CANCEL_S,
                          what="finetune cancelled")
            recorded_s = time.monotonic() - started
            gone, alive = psutil.wait_procs(ray_workers, timeout=max(1.0, CANCEL_S - recorded_s))
            stopped_s = time.monotonic() - started
            assert not alive, f"the stage's Ray task still runs {stopped_s:.1f} s after the cancel: {alive}"
            assert final["status"] == "cancelled", json.dumps(final)[:2000]
            assert stopped_s < CANCEL_S, f"recorded cancelled after {recorded_s:.1f} s, stopped after {stopped_s:.1f} s"
        finally:
            os.killpg(restarted.pid, signal.SIGTERM)
            restarted.wait(30)


def _zoo_file(home: Path, model: Path, text: Path) -> Path:
    """Two pairs (one model, two recipes) of quick magnitude prunes, scheduled every night at 02:00."""
    import yaml

    zoo = home / "cluster-zoo.yaml"
    zoo.write_text(yaml.safe_dump({
        "name": "cluster-zoo", "cron": "0 2 * * *",
        "recipes": [{"name": name, "stages": [{"stage": "prune", "method": "magnitude", **target}]}
                    for name, target in (("mag-50", {"sparsity": 0.5}), ("mag-24", {"pattern": "2:4"}))],
        "models": [{"model": str(model), "calibration": str(text), "evaluation": str(text)}],
    }))
    return zoo


def test_a_night_runs_each_pair_as_a_flow_run_on_the_workers(cluster, store, tiny_model_dir, tiny_text_file):
    """`sparseflow nightly --now` in cluster mode: each (model, recipe) is its own job and its own flow run of
    the `compression-job` deployment, run by the Prefect workers, not by the process that started the night."""
    from orchestrator.store import zoo as zoo_store

    zoo = _zoo_file(Path(cluster.home), tiny_model_dir, tiny_text_file)
    night = subprocess.run([str(Path(sys.executable).parent / "sparseflow"), "nightly", "--now", str(zoo)],
                           env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert night.returncode == 0, night.stdout[-3000:] + night.stderr[-3000:]
    workers = {record.pid for record in cluster.processes if record.name.startswith("worker")}
    with store() as session:
        [last] = zoo_store.list_nights(session, "cluster-zoo")
        jobs = [night_job.job for night_job in zoo_store.night_jobs(session, last.id)]
    assert [job.status for job in jobs] == ["succeeded"] * 2, [job.error for job in jobs]
    assert all(job.flow_run_id for job in jobs) and len({job.flow_run_id for job in jobs}) == 2
    runners = {_runner_process(store, job.id)[1] for job in jobs}
    assert runners <= workers, f"pairs ran by {runners}, the cluster's workers are {workers}"


def test_a_served_zoo_is_a_deployment_on_its_cron(cluster, tiny_model_dir, tiny_text_file):
    """`sparseflow nightly ZOO` serves the night as a Prefect deployment whose schedule is the zoo's cron."""
    zoo = _zoo_file(Path(cluster.home), tiny_model_dir, tiny_text_file)
    log = open(Path(cluster.home) / "cluster" / "logs" / "nightly-served.log", "ab")  # noqa: SIM115
    served = subprocess.Popen([str(Path(sys.executable).parent / "sparseflow"), "nightly", str(zoo)],
                              env={**os.environ, **cluster.env}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline, found = time.monotonic() + 180, []
        while time.monotonic() < deadline and served.poll() is None and not found:
            answer = httpx.post(f"{cluster.urls['prefect']}/deployments/filter", timeout=10,
                                json={"deployments": {"name": {"any_": ["cluster-zoo"]}}})
            found = answer.json() if answer.status_code == 200 else []
            time.sleep(1)
        assert found, f"no deployment 'cluster-zoo' (the served night exited {served.poll()})"
        [deployment] = found
        assert [s["schedule"].get("cron") for s in deployment["schedules"]] == ["0 2 * * *"]
        assert [s["active"] for s in deployment["schedules"]] == [True]
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(60)
        log.close()
