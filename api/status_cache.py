"""Rendered job statuses, shared by the requests of one process for a fraction of a second.

Clients watch a job by polling `GET /v1/jobs/{job_id}`; with many watchers the same body is rendered
over and over (five store reads and a JSON dump, ~2-4 CPU ms). Here a body is kept for `ttl_s` per
(job, caller), and concurrent misses for one key wait on the one render in flight instead of each
running their own. A poller therefore sees a status at most `ttl_s` old; a write that this process makes
through the API (start, cancel, resume) drops the job's entries at once, so its own answer and the next
read agree. Errors (404) are never kept: the next request asks the store again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

Key = tuple[str, str]  # (job id, owner): the owner is part of the key, so one owner's body is never another's


class StatusCache:
    """A small LRU of status bodies with a time to live.

    `get` runs on the event loop; `forget` may also be called from the sync handlers' worker threads, so the
    table itself is behind a lock (held for dictionary operations only, never across a render).
    """

    def __init__(self, ttl_s: float, max_entries: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, tuple[float, asyncio.Future[bytes]]] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: Key, render: Callable[[], Awaitable[bytes]]) -> bytes:
        """The body for `key`: the kept one while it is fresh, else `render()`'s, shared by concurrent callers.

        The render runs as its own task, so a caller that goes away (a closed connection) cancels only its
        own wait, never the render that the others wait on.
        """
        if self.ttl_s <= 0:
            return await render()
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= now:
                task = asyncio.ensure_future(render())
                entry = self._entries[key] = (now + self.ttl_s, task)
                task.add_done_callback(lambda done: self._drop_if_failed(key, done))
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
        return await asyncio.shield(entry[1])

    def _drop_if_failed(self, key: Key, task: asyncio.Future[bytes]) -> None:
        if task.cancelled() or task.exception() is not None:
            with self._lock:
                if key in self._entries and self._entries[key][1] is task:
                    del self._entries[key]

    def forget(self, job_id: str) -> None:
        """Drop every kept body of `job_id` (after this process changed the job)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == job_id]:
                del self._entries[key]
