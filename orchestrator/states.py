"""Job and stage-run statuses and the transitions allowed between them.

Both tables share one shape: queued work starts or is cancelled, running work ends, and failed or
cancelled work may be queued again (resume). They differ in one edge: a succeeded stage run may be
queued again (it is re-run, e.g. after its recipe changed), while a succeeded job is final.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

Entity = Literal["job", "stage_run"]


class Status(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"
    """A stage run its job never reached because an earlier stage failed (stage runs only)."""

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.succeeded, Status.failed, Status.cancelled, Status.skipped})

_RESUMABLE = {
    Status.queued: frozenset({Status.running, Status.cancelled, Status.skipped}),
    Status.running: frozenset({Status.succeeded, Status.failed, Status.cancelled}),
    Status.failed: frozenset({Status.queued}),
    Status.cancelled: frozenset({Status.queued}),
    Status.skipped: frozenset({Status.queued}),
}

TRANSITIONS: dict[Entity, dict[Status, frozenset[Status]]] = {
    "job": {
        **{status: allowed - {Status.skipped} for status, allowed in _RESUMABLE.items() if status != Status.skipped},
        Status.succeeded: frozenset(),
    },
    "stage_run": {**_RESUMABLE, Status.succeeded: frozenset({Status.queued})},
}


class InvalidTransition(ValueError):
    """A status change that the transition table does not allow."""

    def __init__(self, entity: Entity, ident: str, current: Status, new: Status) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[entity][current])) or "none (final)"
        super().__init__(
            f"{entity} {ident}: cannot move from {current.value!r} to {new.value!r}; "
            f"allowed from {current.value!r}: {allowed}"
        )
        self.entity = entity
        self.ident = ident
        self.current = current
        self.new = new


def check_transition(entity: Entity, current: Status | str, new: Status | str, *, ident: str = "?") -> None:
    """Raise `InvalidTransition` unless `entity` may move from `current` to `new`."""
    current, new = Status(current), Status(new)
    if new not in TRANSITIONS[entity][current]:
        raise InvalidTransition(entity, ident, current, new)
