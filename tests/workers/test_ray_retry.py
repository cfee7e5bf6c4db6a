"""Ray retrying a stage after its worker process died shows as a new attempt, with a note and fresh progress.

A real job runs in this process on the suite's local Ray. Once its fine-tune reports progress, the test
SIGKILLs the Ray worker process executing it (found among this process's descendants by the title Ray
gives a worker running a task: `ray::<task name>`, here `ray::stage:02-finetune`). Ray re-runs the task by
itself (`workers.placement.SYSTEM_RETRIES`); the job must still succeed, and its record must say what
happened instead of showing attempt 1 with the progress of the dead attempt.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_harness")

FIND_S = 120  # the job reaching its fine-tune on a busy machine
RUN_S = 180  # the job ending after the kill
LABEL = "02-finetune"


def _stage_worker(label: str) -> psutil.Process | None:
    """The Ray worker of this process's own Ray node running the task named `stage:<label>`."""
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(f"ray::stage:{label}"):
                return process
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


def test_ray_retry_after_worker_death_is_a_new_attempt_with_a_note(settings: Any, tiny_model_dir: Path,
                                                                    tiny_text_file: Path) -> None:
    from orchestrator.service import Orchestrator, submit_job
    from orchestrator.states import Status
    from orchestrator.store import queries
    from pipelines.recipe import Recipe

    one_cpu = {"num_cpus": 1}  # one torch thread: on a busy machine more threads are far slower
    # the fine-tune must run long enough for the 0.1-s poll below to see it running with progress: on a
    # quiet machine 150 steps took 0.6 s, and the test once never caught it
    recipe = Recipe.model_validate({
        "name": "ray-retry", "model": str(tiny_model_dir), "seed": 0,
        "data": {"calibration": str(tiny_text_file), "evaluation": str(tiny_text_file)},
        "stages": [
            {"stage": "calibrate", "samples": 2, "seq_len": 16, "batch_size": 2, "resources": one_cpu},
            {"stage": "prune", "method": "magnitude", "pattern": "2:4", "resources": one_cpu},
            {"stage": "finetune", "steps": 600, "batch_size": 1, "seq_len": 16, "warmup_steps": 0,
             "resources": one_cpu},
        ],
    })
    orchestrator = Orchestrator(settings)
    with orchestrator.sessions.begin() as session:
        job_id = submit_job(session, recipe).id
        finetune_id = queries.stage_runs(session, job_id)[2].id

    progress: list[tuple[str, int]] = []  # ("progress", done) and ("note", at_retry) in the order they came
    at_retry: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("stage_run_id") != finetune_id:
            return
        if event["type"] == "progress":
            progress.append(("progress", event["done"]))
        elif event["type"] == "note":  # recorded just before the event: the row as the retry left it
            with orchestrator.sessions() as session:
                run = queries.get_stage_run(session, finetune_id)
                at_retry.update(attempt=run.attempt, done=run.progress_done, total=run.progress_total,
                                message=run.progress_message, note=event["note"])
            progress.append(("note", 0))

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["status"] = orchestrator.run(job_id, on_event=on_event)
        except BaseException as error:  # reported by the main thread
            outcome["error"] = error

    runner = threading.Thread(target=run, name="ray-retry-job", daemon=True)
    runner.start()
    killed = None
    try:
        deadline = time.monotonic() + FIND_S
        while killed is None and time.monotonic() < deadline and runner.is_alive():
            with orchestrator.sessions() as session:
                run = queries.get_stage_run(session, finetune_id)
                reported = run.status == Status.running and run.progress_done > 0
            worker = _stage_worker(LABEL) if reported else None
            if worker is not None:
                worker.kill()
                killed = worker.pid
            time.sleep(0.1)
        assert killed is not None, f"never saw the fine-tune's Ray worker running ({outcome})"
        runner.join(RUN_S)
        assert not runner.is_alive(), f"the job did not end within {RUN_S} s after its worker was killed"
    finally:
        if runner.is_alive():
            with orchestrator.sessions.begin() as session:
                orchestrator.cancel(session, job_id)  # the flow stops its Ray task within a poll
            runner.join(30)
        orchestrator.close()

    assert outcome.get("status") == "succeeded", outcome
    with orchestrator.sessions() as session:
        stage = queries.get_stage_run(session, finetune_id)
        notes = [t.value for t in queries.job_tags(session, job_id)
                 if t.stage_run_id == finetune_id and t.key == "note"]
        earlier = [(r.attempt, r.status) for r in queries.stage_runs(session, job_id)[:2]]
    assert (stage.status, stage.attempt) == (Status.succeeded, 2), (stage.status, stage.attempt, notes)
    assert earlier == [(1, Status.succeeded), (1, Status.succeeded)]
    assert any(note.startswith("Ray retried the stage (attempt 2 on Ray)") for note in notes), notes
    assert stage.progress_done == stage.progress_total > 0  # the new attempt's own progress, to the end

    # progress restarted with the new attempt: reset when the retry was recorded, then counted from the start
    assert at_retry.get("attempt") == 2 and (at_retry["done"], at_retry["total"]) == (0, 0), at_retry
    assert at_retry["message"] == "retrying"
    kinds = [kind for kind, _ in progress]
    assert kinds.count("note") == 1, progress
    cut = kinds.index("note")
    before = [done for _, done in progress[:cut]]
    after = [done for _, done in progress[cut + 1:]]
    assert before and max(before) > 0, progress
    assert after and after[0] < max(before), f"the new attempt's progress did not restart: {progress}"
