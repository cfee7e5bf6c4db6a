"""The stand-in `sleep` stage: holds for its time, reports progress, writes a marker; allowed anywhere in a recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipelines.recipe import DataSpec, RecipeError, SleepStage, parse_recipe
from pipelines.stage import StageContext
from pipelines.stages import get_stage
from workers.runner import StageRequest, execute_stage


def _context(tmp_path: Path, calls: list[tuple[int, int, str]]) -> StageContext:
    return StageContext(workdir=tmp_path / "w", inputs={}, data=DataSpec(), cache_dir=tmp_path / "cache",
                        progress=lambda done, total, message: calls.append((done, total, message)))


def test_sleeps_its_time_reports_progress_and_writes_a_marker(tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    spec = SleepStage(seconds=1.2, resources={"num_gpus": 1, "num_cpus": 0.5})
    started = time.monotonic()
    result = get_stage("sleep")(spec, _context(tmp_path, calls))
    elapsed = time.monotonic() - started

    assert 1.2 <= elapsed < 1.2 + 1.0  # the upper bound is loose: the machine is shared
    assert [(done, total) for done, total, _ in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]  # a tick per 0.5 s
    assert calls[-1][2] == "slept 1.2 of 1.2 s"
    marker = json.loads(result.outputs["marker"].read_text())
    assert set(result.outputs) == {"marker"}
    assert marker["stage"] == "sleep" and marker["seconds"] == 1.2
    assert 1.2 <= marker["slept_seconds"] <= elapsed
    assert marker["started_at"] < marker["finished_at"]
    assert marker["resources"] == {"num_cpus": 0.5, "num_gpus": 1.0, "memory_gb": None}
    assert marker["device"] == "cpu"
    assert [(m.name, m.value) for m in result.metrics] == [("slept_seconds", marker["slept_seconds"])]


def test_zero_seconds_returns_at_once_with_one_tick(tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    started = time.monotonic()
    result = get_stage("sleep")(SleepStage(seconds=0), _context(tmp_path, calls))
    assert time.monotonic() - started < 0.5
    assert [(done, total) for done, total, _ in calls] == [(0, 1), (1, 1)]
    assert json.loads(result.outputs["marker"].read_text())["slept_seconds"] < 0.5


def test_the_worker_stores_the_marker_as_an_artifact(tmp_path: Path) -> None:
    request = StageRequest(
        job_id="job-1", stage_run_id="run-1", label="00-sleep", spec={"stage": "sleep", "seconds": 0.1},
        data=DataSpec().model_dump(), seed=0, inputs={}, artifact_root=(tmp_path / "artifacts").as_uri(),
        cache_dir=str(tmp_path / "cache"),
    )
    outcome = execute_stage(request)
    [artifact] = outcome.artifacts
    assert artifact["kind"] == "marker" and artifact["size_bytes"] > 0 and len(artifact["sha256"]) == 64
    assert outcome.seconds >= 0.1
    assert dict((name, value) for name, value, _ in outcome.metrics)["slept_seconds"] >= 0.1


def _recipe(*stages: dict) -> dict:
    return {"model": "builtin:smollm2-135m", "stages": list(stages)}


def test_sleep_may_go_anywhere_in_a_recipe() -> None:
    sleep = {"stage": "sleep", "seconds": 0.5}
    recipe = parse_recipe(_recipe(sleep, {"stage": "calibrate"}, sleep, {"stage": "prune"}, sleep,
                                  {"stage": "finetune"}, sleep, {"stage": "evaluate"}, sleep,
                                  {"stage": "kernel_tune"}, sleep))
    assert [s.stage for s in recipe.stages].count("sleep") == 6
    assert parse_recipe(_recipe(sleep)).stages[0] == SleepStage(seconds=0.5)
    # the order rules still hold around it
    with pytest.raises(RecipeError, match="stages.3: 'prune' comes after the 'evaluate'"):
        parse_recipe(_recipe({"stage": "calibrate"}, {"stage": "evaluate"}, sleep, {"stage": "prune"}))


@pytest.mark.parametrize(("seconds", "reason"), [
    (-1, "greater than or equal to 0"),
    (3600.5, "less than or equal to 3600"),
    (float("nan"), "finite number"),
    ("soon", "valid number"),
])
def test_bad_seconds_name_the_field(seconds: object, reason: str) -> None:
    with pytest.raises(RecipeError, match=rf"stages\.0\.sleep\.seconds: .*{reason}"):
        parse_recipe(_recipe({"stage": "sleep", "seconds": seconds}))


def test_unknown_sleep_key_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"stages\.0\.sleep\.minutes: Extra inputs are not permitted"):
        parse_recipe(_recipe({"stage": "sleep", "minutes": 1}))
