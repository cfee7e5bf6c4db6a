"""Ray placement: resources from the recipe, GPU fallback, a real stage on a worker with progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from pipelines.recipe import Resources
from workers import placement
from workers.runner import SOURCE_PREFIX, StageOutcome, StageRequest


def test_gpu_request_on_a_cpu_cluster_falls_back_with_a_note() -> None:
    options, note = placement.fit_resources(Resources(num_gpus=1), {"CPU": 2.0})
    assert "num_gpus" not in options
    assert note and "ran on CPU" in note


def test_resources_map_to_ray_options() -> None:
    options, note = placement.fit_resources(Resources(num_cpus=1, num_gpus=0.5, memory_gb=2), {"CPU": 8, "GPU": 2})
    assert options == {"num_cpus": 1, "num_gpus": 0.5, "memory": 2 * 1024**3}
    assert note is None


def test_requests_beyond_the_cluster_are_cut_with_a_note_naming_the_field() -> None:
    """Ray would leave an infeasible task pending forever: run with what exists and say so."""
    options, note = placement.fit_resources(Resources(num_cpus=64, num_gpus=8, memory_gb=64),
                                            {"CPU": 4.0, "GPU": 2.0, "memory": 8 * 1024**3})
    assert options == {"num_cpus": 4.0, "num_gpus": 2.0}
    assert "resources.num_cpus" in note and "resources.num_gpus" in note and "resources.memory_gb" in note


def test_default_cpus_take_the_whole_node() -> None:
    options, _ = placement.fit_resources(Resources(), {"CPU": 6.0})
    assert options["num_cpus"] == 6.0


def _request(tmp_path: Path, model_dir: Path, text: Path, stage_run_id: str = "sr1") -> StageRequest:
    return StageRequest(
        job_id="job1", stage_run_id=stage_run_id, label="00-calibrate",
        spec={"stage": "calibrate", "samples": 4, "seq_len": 32, "batch_size": 1},
        data={"calibration": str(text), "evaluation": str(text)}, seed=0,
        inputs={"model": SOURCE_PREFIX + str(model_dir), "base_model": SOURCE_PREFIX + str(model_dir)},
        artifact_root=(tmp_path / "artifacts").as_uri(), cache_dir=str(tmp_path / "cache"),
    )


@pytest.mark.usefixtures("ray_cluster")
def test_stage_runs_on_a_logical_gpu_and_reports_progress(tmp_path: Path, tiny_model_dir: Path,
                                                          text_file: Path) -> None:
    placed = placement.submit(_request(tmp_path, tiny_model_dir, text_file), Resources(num_gpus=1))
    assert placed.num_gpus == 1 and placed.note is None
    outcome = ray.get(placed.ref, timeout=300)
    events = placed.drain(final=True)
    assert len(outcome.gpu_ids) == 1
    assert outcome.device == "cpu", "no real GPU here: the stage computes on the CPU"
    assert events and events[-1]["done"] == events[-1]["total"]
    (calibration,) = outcome.artifacts
    assert calibration["kind"] == "calibration" and calibration["uri"].startswith("file://")
    assert Path(calibration["uri"][len("file://"):]).is_file()


@pytest.mark.usefixtures("ray_cluster")
def test_stage_error_reaches_the_caller_unretried(tmp_path: Path, tiny_model_dir: Path) -> None:
    request = _request(tmp_path, tiny_model_dir, tmp_path / "missing.txt")
    placed = placement.submit(request, Resources(num_cpus=1))
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(placed.ref, timeout=300)
    assert "missing.txt" in str(raised.value)


def _sleep_request(tmp_path: Path, model_dir: Path, stage_run_id: str) -> StageRequest:
    return StageRequest(
        job_id="job1", stage_run_id=stage_run_id, label=f"{stage_run_id}-sleep",
        spec={"stage": "sleep", "seconds": 0.0}, data={}, seed=0,
        inputs={"model": SOURCE_PREFIX + str(model_dir), "base_model": SOURCE_PREFIX + str(model_dir)},
        artifact_root=(tmp_path / "artifacts").as_uri(), cache_dir=str(tmp_path / "cache"),
    )


def _ran_in(outcome: StageOutcome) -> tuple[int, str | None]:
    """The worker process and the devices Ray gave it, from the sleep stage's marker."""
    (marker,) = outcome.artifacts
    written = json.loads(Path(marker["uri"][len("file://"):]).read_text())
    return written["pid"], written["cuda_visible_devices"]


@pytest.mark.usefixtures("ray_cluster")
def test_every_gpu_stage_gets_a_fresh_worker_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    """CUDA reads CUDA_VISIBLE_DEVICES once per process: a worker reused by a later GPU stage would compute
    on the earlier stage's device whatever GPU Ray granted. CPU stages may share a worker."""
    ran = []
    for index in range(3):
        placed = placement.submit(_sleep_request(tmp_path, tiny_model_dir, f"gpu{index}"), Resources(num_gpus=1))
        ran.append(_ran_in(ray.get(placed.ref, timeout=300)))
    assert len({pid for pid, _ in ran}) == 3, ran
    assert all(devices is not None for _, devices in ran), "Ray told each GPU stage its device"
    cpu_pids = set()
    for index in range(3):
        placed = placement.submit(_sleep_request(tmp_path, tiny_model_dir, f"cpu{index}"), Resources(num_cpus=1))
        pid, _ = _ran_in(ray.get(placed.ref, timeout=300))
        cpu_pids.add(pid)
    assert len(cpu_pids) < 3, "CPU stages reuse the job's Ray workers"
