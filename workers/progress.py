"""Progress events from a running stage to whoever watches the job, through a mailbox actor.

A stage posts small dict events (progress, and one `attempt` event each time Ray starts it) to a
mailbox: a Ray actor that keeps them per stage run until the watcher of that stage takes them. There is
one mailbox per Ray cluster, a named detached actor that every process submitting stages finds or
makes on first use: an actor costs a worker process of its own (a couple of CPU seconds to start),
and on a cluster each flow run is its own Ray job, so a mailbox per process put that
start in front of every job's first stage. Events are keyed by stage run id, so jobs never see each
other's; events that nobody takes (a watcher that died) are dropped after `STALE_AFTER_S`.

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
from collections.abc import Callable
from typing import Any

import ray

log = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.25
_FLUSH_TIMEOUT_S = 10.0


MAILBOX_NAME = "sparseflow-progress"
MAILBOX_NAMESPACE = "sparseflow"
STALE_AFTER_S = 3600.0
_PRUNE_EVERY_S = 60.0


class EventStore:
    """Events kept per stage run until taken; a stage run nobody posted to or took from for `stale_after_s`
    is dropped, so a long-lived mailbox does not keep the events of watchers that died."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._touched: dict[str, float] = {}
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._pruned_at = clock()

    def post(self, stage_run_id: str, event: dict[str, Any]) -> None:
        self._events.setdefault(stage_run_id, []).append(event)
        self._touch(stage_run_id)

    def take(self, stage_run_id: str) -> list[dict[str, Any]]:
        self._touch(stage_run_id)
        self._touched.pop(stage_run_id, None)
        return self._events.pop(stage_run_id, [])

    def pending(self) -> int:
        """Stage runs with events not taken yet."""
        return len(self._events)

    def _touch(self, stage_run_id: str) -> None:
        now = self._clock()
        self._touched[stage_run_id] = now
        if now - self._pruned_at >= min(_PRUNE_EVERY_S, self._stale_after_s):
            self._pruned_at = now
            for stale in [key for key, seen in self._touched.items() if now - seen > self._stale_after_s]:
                self._touched.pop(stale)
                self._events.pop(stale, None)


Mailbox = ray.remote(num_cpus=0)(EventStore)


_mailboxes: dict[str, Any] = {}
_mailbox_lock = threading.Lock()


def mailbox() -> Any:
    """The cluster's mailbox, found or made on first use in this connection. Returns at once: a new actor
    starts in the background (`placement.connect` asks for it early so that it is up by the first stage)."""
    ray_job = ray.get_runtime_context().get_job_id()  # a new one after ray.shutdown() and init again
    with _mailbox_lock:
        if ray_job not in _mailboxes:
            _mailboxes.clear()
            _mailboxes[ray_job] = Mailbox.options(
                name=MAILBOX_NAME, namespace=MAILBOX_NAMESPACE, lifetime="detached", get_if_exists=True,
            ).remote()
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
