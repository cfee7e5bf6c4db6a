"""Exceptions raised by the lineage store; the API maps them to HTTP statuses in one place."""

from __future__ import annotations

from orchestrator.states import InvalidTransition

__all__ = ["InvalidTransition", "NotFound", "StoreError"]


class StoreError(Exception):
    """Base class for store errors other than `InvalidTransition` (a `ValueError`)."""


class NotFound(StoreError, LookupError):
    """No row of `entity` with id `ident`."""

    def __init__(self, entity: str, ident: object) -> None:
        super().__init__(f"{entity} {ident!r} not found")
        self.entity = entity
        self.ident = ident
