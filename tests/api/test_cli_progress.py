"""Progress as plain lines when stdout is not a terminal, and Ray's token notice kept out of the output."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from api.display import JobDisplay, job_progress
from api.plain_progress import PlainProgress
from pipelines.recipe import Recipe

RECIPE = Recipe.model_validate({"name": "p", "stages": [{"stage": "sleep", "seconds": 1},
                                                       {"stage": "sleep", "seconds": 1}]})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stage(run: str, label: str, status: str, **extra: object) -> dict[str, object]:
    return {"type": "stage", "stage_run_id": run, "label": label, "status": status, **extra}


def _progress(run: str, done: int, total: int, message: str = "") -> dict[str, object]:
    return {"type": "progress", "stage_run_id": run, "done": done, "total": total, "message": message}


def test_a_pipe_gets_plain_lines_and_a_terminal_gets_bars() -> None:
    piped = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(job_progress(piped, RECIPE), PlainProgress)
    assert isinstance(job_progress(Console(file=io.StringIO(), force_terminal=True), RECIPE), JobDisplay)


def test_stage_start_and_end_are_lines_and_progress_is_rate_limited() -> None:
    out, clock = io.StringIO(), Clock()
    with PlainProgress(out, RECIPE, clock=clock) as plain:
        plain.handle(_stage("a", "00-sleep", "running"))
        for step in range(1, 1001):  # a stage reporting 1000 times over 100 s
            clock.now = step * 0.1
            plain.handle(_progress("a", step, 1000, f"step {step}"))
        plain.handle(_stage("a", "00-sleep", "succeeded", seconds=100.04))
    lines = out.getvalue().splitlines()
    assert "00-sleep" in lines[0] and lines[0].endswith("running")
    assert lines[-1].endswith("succeeded in 100.0 s")
    middle = lines[1:-1]
    assert 5 <= len(middle) <= 11, middle  # one per tenth reached, never two within 5 s
    assert "100% (1000/1000) step 1000" not in middle[0] and "%" in middle[0]


def test_a_slow_stage_within_one_tenth_still_reports_every_quiet_interval() -> None:
    out, clock = io.StringIO(), Clock()
    plain = PlainProgress(out, RECIPE, clock=clock, quiet_interval_s=30.0)
    plain.handle(_stage("a", "00-sleep", "running"))
    for second in range(1, 121):  # 2 minutes moving through the first 5%
        clock.now = float(second)
        plain.handle(_progress("a", second, 2400, f"token {second}"))
    progress_lines = out.getvalue().splitlines()[1:]
    # the first tenth is "reached" at the first event past 5 s, then one line per 30 s
    assert 4 <= len(progress_lines) <= 5, progress_lines


def test_cache_hits_failures_and_notes_are_lines_too() -> None:
    out = io.StringIO()
    plain = PlainProgress(out, RECIPE)
    plain.handle(_stage("a", "00-sleep", "succeeded", notes=["cached: same inputs, parameters and code"]))
    plain.handle(_stage("b", "01-sleep", "running"))
    plain.handle({"type": "note", "stage_run_id": "b", "note": "Ray retried the stage"})
    plain.handle(_stage("b", "01-sleep", "failed", error="ValueError: " + "x" * 2000))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("succeeded (cached: same inputs, parameters and code)")
    assert "01-sleep" in lines[2] and "note: Ray retried the stage" in lines[2]
    assert "failed: ValueError" in lines[3] and len(lines[3]) < 600


def test_rays_token_notice_is_dropped_at_its_logger_and_its_auth_off_warning_is_not() -> None:
    from ray._private.authentication import authentication_token_setup as setup

    from workers.local_ray import quiet_token_notice

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(setup.__name__)
    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_token_notice()
        quiet_token_notice()
        setup._warn_token_auth_enabled()  # Ray's own functions, as ray.init calls them
        setup._warn_token_auth_disabled()
    finally:
        logger.removeHandler(handler)
    assert not any(m.startswith("Token authentication is enabled") for m in seen)
    assert any(m.startswith("Token authentication is disabled") for m in seen)
