"""The API process dies mid-job and starts again: nothing stays `running` or `queued` forever.

Real processes: `sparseflow serve` (embedded mode, one job at a time) runs tiny jobs on its own local Ray.
The test SIGKILLs its whole process group while a fine-tune runs, as a crashed pod dies, and starts
`sparseflow serve` again on the same home. The new service's reconciler must find every job the dead
process owned:

- the running job (recipe default `max_resumes: 1`) is failed "interrupted", resumed once, and ends
  succeeded without recomputing its finished stages: only the interrupted stage runs again (attempt 2);
- the job queued behind it is reconciled the same way and runs;
- a job with `max_resumes: 0`, killed the same way (a second crash), stays failed "interrupted" with the
  stage it never reached skipped, until `POST /v1/jobs/{id}/resume` runs it to the end; resuming it again
  while it is recorded running answers 409 and says how to take it over (`force`).

Every process the services start carries a marker in its environment; teardown kills the services'
process groups and every marked process, whatever happened (never anyone else's Ray).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy.orm import Session

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills process groups, reads /proc")

TEST_MARK = "SFTEST_CRASH_RECONCILE"
"""Set in the services' environment only (no SPARSEFLOW_ prefix: not a setting); their descendants inherit it."""
START_S = 300  # serve answering, and a job reaching its fine-tune (a local Ray and Prefect's server start first)
RUN_S = 300  # resumed jobs running to the end
FINETUNE_STEPS = 400  # a few seconds on a fast idle machine: long enough to catch it running


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked(value: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TEST_MARK) == value:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Service:
    """One `sparseflow serve` in a process group of its own, on a free loopback port."""

    def __init__(self, home: Path, log: Path, mark: str) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPARSEFLOW_", "PREFECT_API_", "RAY_ADDRESS"))}
        env.update(
            SPARSEFLOW_HOME=str(home), SPARSEFLOW_MAX_CONCURRENT_JOBS="1", SPARSEFLOW_RAY_NUM_CPUS="1",
            SPARSEFLOW_RAY_NUM_GPUS="0", SPARSEFLOW_HEARTBEAT_S="0.5", SPARSEFLOW_RECONCILE_EVERY_S="1",
            # the tests watch a job's live state (the fine-tune caught mid-run): no kept status in between
            SPARSEFLOW_STATUS_CACHE_S="0",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(START_S), PYTHONUNBUFFERED="1",
            **{TEST_MARK: mark},
        )
        self.log = log
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        wait_for(self._healthy, START_S, "the API to answer", self)

    def _healthy(self) -> bool:
        try:
            return self.client.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text[:500]
        return response.json()

    def kill(self) -> None:
        """SIGKILL the service's whole process group: no code of it runs again."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.client.close()


def wait_for(done: Callable[[], Any], within_s: float, what: str, service: Service) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert service.process.poll() is None, f"serve exited early:\n{service.tail()}"
        result = done()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {within_s:g} s waiting for {what}; serve log:\n{service.tail()}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[], Service]]:
    """Start services on one home; teardown kills them and every process they started."""
    mark, started = uuid.uuid4().hex, []

    def start() -> Service:
        log = tmp_path / f"serve-{len(started) + 1}.log"
        started.append(Service(tmp_path / "home", log, mark))
        return started[-1]

    try:
        yield start
    finally:
        for service in started:
            service.kill()
        for _ in range(3):  # a dying raylet may start workers: sweep until none is left
            left = _marked(mark)
            if not left:
                break
            for process in left:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    continue
            psutil.wait_procs(left, timeout=5)


def _recipe(model: Path, text: Path, name: str, *, finetune_steps: int, stages: int = 4,
            **extra: Any) -> dict[str, Any]:
    one_cpu = {"num_cpus": 1}  # one torch thread: on a busy machine more threads are far slower
    return {
        "name": name, "model": str(model), "data": {"calibration": str(text), "evaluation": str(text)},
        "seed": 0, "reuse_cached": False, **extra,  # every stage computed: none finishes early from the cache
        "stages": [
            {"stage": "calibrate", "samples": 2, "seq_len": 16, "batch_size": 2, "resources": one_cpu},
            {"stage": "prune", "method": "magnitude", "pattern": "2:4", "resources": one_cpu},
            {"stage": "finetune", "steps": finetune_steps, "batch_size": 1, "seq_len": 16, "warmup_steps": 0,
             "resources": one_cpu},
            {"stage": "evaluate", "seq_len": 16, "max_windows": 2, "compare_dense": False, "resources": one_cpu},
        ][:stages],
    }


def _submit(service: Service, recipe: dict[str, Any]) -> str:
    response = service.client.post("/v1/jobs", json={"recipe": recipe})
    assert response.status_code == 201, response.text[:500]
    return response.json()["id"]


def _stages(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["kind"]: stage for stage in job["stages"]}


def _in_finetune(service: Service, job_id: str) -> dict[str, Any] | None:
    job = service.job(job_id)
    assert job["status"] in ("queued", "running"), f"job {job_id} ended early: {job}\n{service.tail()}"
    finetune = _stages(job)["finetune"]
    return job if finetune["status"] == "running" and finetune["progress_done"] > 0 else None


def _ended(service: Service, job_id: str) -> dict[str, Any] | None:
    job = service.job(job_id)
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def _job_notes(home: Path, job_id: str) -> list[str]:
    """The job's own notes (not a stage's), read from the store: the status page shows stage notes only."""
    from orchestrator.settings import Settings
    from orchestrator.store import db, queries

    engine = db.make_engine(Settings(home=home).database)
    try:
        with Session(engine) as session:
            return [t.value for t in queries.job_tags(session, job_id) if t.key == "note" and t.stage_run_id is None]
    finally:
        engine.dispose()


def _kill_in_finetune(service: Service, job_id: str) -> dict[str, Any]:
    """SIGKILL the service while `job_id` fine-tunes; return the job as it was just before."""
    wait_for(lambda: _in_finetune(service, job_id), START_S, f"job {job_id} to fine-tune", service)
    before = service.job(job_id)
    service.kill()
    return before


def test_killed_service_restarts_and_reconciles_its_jobs(
    services: Callable[[], Service], tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path
) -> None:
    home = tmp_path / "home"
    first = services()
    resumed = _submit(first, _recipe(tiny_model_dir, tiny_text_file, "resumed", finetune_steps=FINETUNE_STEPS))
    queued = _submit(first, _recipe(tiny_model_dir, tiny_text_file, "queued", finetune_steps=2, stages=2))
    before = _kill_in_finetune(first, resumed)
    assert _stages(before)["finetune"]["status"] == "running"

    # the restarted service fails both (its runner process is gone) and resumes them (max_resumes 1)
    second = services()
    done = wait_for(lambda: _ended(second, resumed), RUN_S, "the resumed job to end", second)
    assert (done["status"], done["resumes"]) == ("succeeded", 1), f"{done}\n{second.tail()}"
    old, new = _stages(before), _stages(done)
    for kind in ("calibrate", "prune"):  # not recomputed
        assert (new[kind]["attempt"], new[kind]["finished_at"]) == (1, old[kind]["finished_at"]), (kind, new[kind])
    assert new["finetune"]["attempt"] == 2 and new["finetune"]["status"] == "succeeded", new["finetune"]
    assert new["finetune"]["progress_done"] == new["finetune"]["progress_total"] == FINETUNE_STEPS
    assert new["evaluate"]["status"] == "succeeded" and new["evaluate"]["attempt"] == 1, new["evaluate"]
    behind = wait_for(lambda: _ended(second, queued), RUN_S, "the queued job to end", second)
    assert (behind["status"], behind["resumes"]) == ("succeeded", 1), f"{behind}\n{second.tail()}"
    assert [stage["attempt"] for stage in behind["stages"]] == [1, 1], behind["stages"]
    for job_id in (resumed, queued):
        notes = _job_notes(home, job_id)
        assert any(note.startswith("interrupted: its runner process") for note in notes), notes
        assert "resumed automatically (1 of 1)" in notes, notes

    # max_resumes 0, killed the same way: failed, interrupted, the stage it never reached skipped
    no_resume = _submit(second, _recipe(tiny_model_dir, tiny_text_file, "no-resume", finetune_steps=FINETUNE_STEPS,
                                        max_resumes=0))
    _kill_in_finetune(second, no_resume)
    third = services()
    stopped = wait_for(lambda: _ended(third, no_resume), START_S, "the no-resume job to be reconciled", third)
    assert stopped["status"] == "failed" and stopped["error"].startswith("interrupted: "), stopped
    stages = _stages(stopped)
    assert [stages[k]["status"] for k in ("calibrate", "prune", "finetune", "evaluate")] == \
        ["succeeded", "succeeded", "failed", "skipped"], stopped["stages"]
    assert stages["finetune"]["error"].startswith("interrupted: ")
    time.sleep(2)  # a few reconcile rounds: it stays failed
    assert third.job(no_resume)["status"] == "failed"

    # resumed by hand; while it is recorded running, a second resume needs force (and says so)
    again = third.client.post(f"/v1/jobs/{no_resume}/resume")
    assert again.status_code == 200, again.text[:500]
    wait_for(lambda: third.job(no_resume)["status"] == "running", START_S, "the resumed job to run", third)
    conflict = third.client.post(f"/v1/jobs/{no_resume}/resume")
    assert conflict.status_code == 409, conflict.text[:500]
    assert "force" in conflict.json()["detail"], conflict.json()
    ended = wait_for(lambda: _ended(third, no_resume), RUN_S, "the job resumed by hand to end", third)
    assert ended["status"] == "succeeded", f"{ended}\n{third.tail()}"
    assert [stage["attempt"] for stage in ended["stages"]] == [1, 1, 2, 1], ended["stages"]

    listed = {job["id"]: job for job in third.client.get("/v1/jobs").json()["data"]}
    assert {job_id: listed[job_id]["resumes"] for job_id in (resumed, queued, no_resume)} == \
        {resumed: 1, queued: 1, no_resume: 0}
    for state in ("running", "queued"):  # nothing left behind
        assert third.client.get("/v1/jobs", params={"status": state}).json()["count"] == 0, state
