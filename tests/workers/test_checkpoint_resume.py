"""A fine-tune attempt that dies mid-run leaves a checkpoint; the next attempt of that stage run resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.runner import SOURCE_PREFIX, StageRequest, attempt_checkpoint_dir, execute_stage


class DiesAtStep:
    """A progress sink that kills the attempt once training reports step `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def emit(self, done: int, total: int, message: str) -> None:
        if "step" in message and done >= self.limit:
            raise KeyboardInterrupt(f"worker killed at step {done}")

    def flush(self) -> None:
        pass


def test_second_attempt_resumes_from_the_first_attempts_checkpoint(tmp_path: Path, tiny_model_dir: Path,
                                                                    text_file: Path) -> None:
    request = StageRequest(
        job_id="job", stage_run_id="ft-run", label="02-finetune",
        spec={"stage": "finetune", "steps": 4, "batch_size": 1, "seq_len": 16, "checkpoint_every": 1},
        data={"calibration": str(text_file), "evaluation": str(text_file)}, seed=0,
        inputs={"model": SOURCE_PREFIX + str(tiny_model_dir), "base_model": SOURCE_PREFIX + str(tiny_model_dir)},
        artifact_root=(tmp_path / "artifacts").as_uri(), cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(KeyboardInterrupt):
        execute_stage(request, DiesAtStep(3))
    assert any(attempt_checkpoint_dir(request).iterdir()), "the killed attempt left its checkpoint behind"
    outcome = execute_stage(request)
    assert any(note.startswith("resumed from a checkpoint after step") for note in outcome.notes)
    assert sorted({step for name, _, step in outcome.metrics if name == "loss"}) == [0, 1, 2, 3]
    assert {a["kind"] for a in outcome.artifacts} >= {"model", "checkpoint"}
