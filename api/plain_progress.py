"""Job progress as plain log lines, for output that is not a terminal (CI logs, `kubectl logs`, a pipe).

A live progress bar redraws one screen region; written to a pipe it shows nothing until the job ends.
`PlainProgress` takes the same events as `api.display.JobDisplay` and writes one line per stage start and
end, and in between at most one progress line per stage per `min_interval_s` when the stage has reached
a new tenth of its work, or per `quiet_interval_s` while it is moving within one tenth: a long stage
reports a line every few percent, a short one only starts and ends. Every line is flushed at once.

    12:04:31 00-calibrate     running
    12:04:41 00-calibrate     40% (26/64) batch 26 of 64
    12:04:49 00-calibrate     succeeded in 18.2 s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.recipe import Recipe

MIN_INTERVAL_S = 5.0
QUIET_INTERVAL_S = 30.0
_LABEL_WIDTH = 16
_MESSAGE_CHARS = 80
_ERROR_CHARS = 500


@dataclass
class _Stage:
    label: str
    started: float | None = None
    printed: float = 0.0
    tenth: int = -1
    last: tuple[int, int, str] | None = None


class PlainProgress:
    """`handle(event)` is the flow's `on_event`; a context manager like `JobDisplay`."""

    def __init__(self, out: IO[str], recipe: Recipe, *, min_interval_s: float = MIN_INTERVAL_S,
                 quiet_interval_s: float = QUIET_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.labels = {f"{i:02d}-{spec.stage}" for i, spec in enumerate(recipe.stages)}
        self.min_interval_s, self.quiet_interval_s, self.clock = min_interval_s, quiet_interval_s, clock
        self.stages: dict[str, _Stage] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Nothing is held back: every line was written when it happened."""

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "stage":
            self._on_stage(event)
        elif kind == "progress":
            self._on_progress(event)
        elif kind == "note":
            stage = self.stages.get(event.get("stage_run_id", ""))
            self._line(stage.label if stage else "", f"note: {event.get('note', '')}")

    def _on_stage(self, event: dict[str, Any]) -> None:
        label = event["label"]
        if label not in self.labels:
            return
        stage = self.stages.setdefault(event["stage_run_id"], _Stage(label))
        status = event["status"]
        if status == "running":
            stage.started = stage.printed = self.clock()
            self._line(label, "running")
            return
        text = status
        if status == "failed":
            text = f"failed: {str(event.get('error', ''))[:_ERROR_CHARS]}"
        elif event.get("seconds") is not None:
            text += f" in {event['seconds']:.1f} s"
        elif stage.started is not None:
            text += f" after {self.clock() - stage.started:.1f} s"
        notes = event.get("notes") or []
        if notes:
            text += f" ({notes[0]})"
        self._line(label, text)

    def _on_progress(self, event: dict[str, Any]) -> None:
        stage = self.stages.get(event["stage_run_id"])
        if stage is None:
            return
        done, total, message = int(event["done"]), max(int(event["total"]), 1), str(event.get("message", ""))
        if stage.last == (done, total, message):
            return
        stage.last = (done, total, message)
        now = self.clock()
        tenth = min(10, done * 10 // total)
        since = now - stage.printed
        if (tenth > stage.tenth and since >= self.min_interval_s) or since >= self.quiet_interval_s:
            stage.tenth, stage.printed = tenth, now
            self._line(stage.label, f"{done * 100 // total:3d}% ({done}/{total}) {message[:_MESSAGE_CHARS]}")

    def _line(self, label: str, text: str) -> None:
        self.out.write(f"{datetime.now():%H:%M:%S} {label:<{_LABEL_WIDTH}} {text}\n")
        self.out.flush()
