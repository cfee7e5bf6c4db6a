"""Progress events from a running stage to whoever watches the job.

The worker puts small dict events on a Ray queue (an actor) that the orchestrator drains while it
waits for the stage; the orchestrator records them and shows them. Events are throttled so that a
stage reporting every batch does not flood the queue, but the last one always goes out.
"""

from __future__ import annotations

import time
from typing import Any

_MIN_INTERVAL_S = 0.25


class ProgressSink:
    """Callable as `sink.emit(done, total, message)`; `queue` is a `ray.util.queue.Queue` or None."""

    def __init__(self, queue: Any | None, stage_run_id: str) -> None:
        self.queue = queue
        self.stage_run_id = stage_run_id
        self._last_sent = 0.0
        self._pending: dict[str, Any] | None = None

    def emit(self, done: int, total: int, message: str) -> None:
        event = {"stage_run_id": self.stage_run_id, "done": int(done), "total": int(total),
                 "message": str(message), "time": time.time()}
        now = time.monotonic()
        if done < total and now - self._last_sent < _MIN_INTERVAL_S:
            self._pending = event
            return
        self._send(event)
        self._last_sent = now

    def flush(self) -> None:
        if self._pending is not None:
            self._send(self._pending)

    def _send(self, event: dict[str, Any]) -> None:
        self._pending = None
        if self.queue is not None:
            self.queue.put_nowait(event)
