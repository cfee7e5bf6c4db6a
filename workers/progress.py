"""Progress events from a running stage to whoever watches the job, through a mailbox actor.

A stage posts small dict events (progress, and one `attempt` event each time Ray starts it) to a
mailbox: a Ray actor that keeps them per stage run until the watcher of that stage takes them. Each
process that submits stages makes one mailbox, on first use, and shares it between all the jobs it
runs: an actor costs a worker process of its own, and making one per job put that start (about a
second) in front of every job's first stage.

Posting is fire-and-forget, so a stage never waits on its watcher, except at `flush`: the stage's last
post is awaited, so everything a finished stage posted can be taken as soon as its result is back
(calls from one caller reach an actor in order). Events are throttled so that a stage reporting every
batch does not flood the mailbox, but the last one always goes out. Progress is advisory: a mailbox
that died loses events, never a stage.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

log = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.25
_FLUSH_TIMEOUT_S = 10.0


@ray.remote(num_cpus=0)
class Mailbox:
    """Events kept per stage run until taken."""

    def __init__(self) -> None:
        self._events: dict[str, list[dict[str, Any]]] = {}

    def post(self, stage_run_id: str, event: dict[str, Any]) -> None:
        self._events.setdefault(stage_run_id, []).append(event)

    def take(self, stage_run_id: str) -> list[dict[str, Any]]:
        return self._events.pop(stage_run_id, [])


_mailboxes: dict[str, Any] = {}
_mailbox_lock = threading.Lock()


def mailbox() -> Any:
    """This process's mailbox on the Ray it is connected to, made on first use. Returns at once: the actor
    starts in the background (`placement.connect` asks for it early so that it is up by the first stage)."""
    ray_job = ray.get_runtime_context().get_job_id()  # a new one after ray.shutdown() and init again
    with _mailbox_lock:
        if ray_job not in _mailboxes:
            _mailboxes.clear()
            _mailboxes[ray_job] = Mailbox.remote()
        return _mailboxes[ray_job]


class ProgressSink:
    """Callable as `sink.emit(done, total, message)`; `box` is a `Mailbox` actor handle or None (no watcher)."""

    def __init__(self, box: Any | None, stage_run_id: str) -> None:
        self.box = box
        self.stage_run_id = stage_run_id
        self._last_sent = 0.0
        self._pending: dict[str, Any] | None = None
        self._last_post: Any = None

    def attempt(self) -> None:
        """Say that this is a (new) attempt of the stage: a second one means Ray re-ran it."""
        self._post({"kind": "attempt", "stage_run_id": self.stage_run_id})

    def emit(self, done: int, total: int, message: str) -> None:
        event = {"stage_run_id": self.stage_run_id, "done": int(done), "total": int(total),
                 "message": str(message), "time": time.time()}
        now = time.monotonic()
        if done < total and now - self._last_sent < _MIN_INTERVAL_S:
            self._pending = event
            return
        self._post(event)
        self._last_sent = now

    def flush(self) -> None:
        """Send the held-back event, then wait until the mailbox has everything this sink posted."""
        if self._pending is not None:
            self._post(self._pending)
        if self._last_post is not None:
            try:
                ray.get(self._last_post, timeout=_FLUSH_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as error:
                log.warning("progress of %s may be incomplete: %s", self.stage_run_id, error)
            self._last_post = None

    def _post(self, event: dict[str, Any]) -> None:
        self._pending = None
        if self.box is not None:
            self._last_post = self.box.post.remote(self.stage_run_id, event)
