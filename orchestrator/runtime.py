"""What a running job flow needs from its process: settings, database sessions, an event callback.

The flow takes nothing but a job id, so any Prefect worker can run it: `runtime_for(job_id)` gives the
runtime a local caller registered for that job (the embedded mode's progress display), else one built
once per process from the environment's `Settings`. `Heartbeat` keeps the job's `heartbeat_at` fresh
while the flow runs, from a thread, so a long stage never looks like a dead runner.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.settings import Settings, get_settings
from orchestrator.store import db, queries

log = logging.getLogger(__name__)

EventFn = Callable[[dict[str, Any]], None]


@dataclass
class JobRuntime:
    """The host process's view of the service: never a flow parameter, never serialized."""

    settings: Settings
    sessions: sessionmaker[Session]
    on_event: EventFn = field(default=lambda event: None)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobRuntime:
        settings.ensure_dirs()
        engine = db.make_engine(settings.database)
        db.migrate(engine)
        return cls(settings, db.session_factory(engine))


_local: dict[str, JobRuntime] = {}
_local_lock = threading.Lock()


@contextmanager
def registered(job_id: str, runtime: JobRuntime) -> Iterator[None]:
    """Make `runtime` the one the flow of `job_id` uses in this process (embedded runs)."""
    with _local_lock:
        _local[job_id] = runtime
    try:
        yield
    finally:
        with _local_lock:
            _local.pop(job_id, None)


@lru_cache(maxsize=1)
def _from_environment() -> JobRuntime:
    return JobRuntime.from_settings(get_settings())


def runtime_for(job_id: str) -> JobRuntime:
    """The registered runtime of `job_id`, else this process's runtime from the environment (a worker)."""
    with _local_lock:
        runtime = _local.get(job_id)
    return runtime if runtime is not None else _from_environment()


def embedded_runner() -> str:
    """The runner name of this process: host and pid, so a restarted service can tell its dead runs."""
    return f"embedded:{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Refresh a job's heartbeat every `settings.heartbeat_s` from a daemon thread while the flow runs.

    `lost` turns true when the job no longer belongs to this runner (another runner took it over after
    this one was presumed dead, or it was ended): the flow then stops rather than race the new owner.
    """

    def __init__(self, runtime: JobRuntime, job_id: str, runner: str) -> None:
        self.runtime, self.job_id, self.runner = runtime, job_id, runner
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.runtime.settings.heartbeat_s):
            try:
                with self.runtime.sessions.begin() as session:
                    owned = queries.beat(session, self.job_id, self.runner)
            except Exception as error:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed: %s", self.job_id, error)
                continue
            if not owned:
                self.lost.set()
