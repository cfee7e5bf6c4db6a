"""Queries for uploaded datasets: text a tenant brought through `POST /v1/datasets`.

Every lookup is scoped to an owner: another owner's dataset reads exactly like one that does not
exist (`NotFound`), so ids cannot be probed across tenants. Like `queries`, these functions flush but
never commit; the caller owns the transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.states import Status
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Dataset, Job, new_id, utcnow


def new_dataset_id() -> str:
    """An id chosen before the row exists, so the file can be written under it first."""
    return new_id()


def add_dataset(
    session: Session, *, dataset_id: str, owner: str, name: str, uri: str, sha256: str, size_bytes: int
) -> Dataset:
    """Record a dataset whose content is already stored at `uri`."""
    dataset = Dataset(
        id=dataset_id, owner=owner, name=name, uri=uri, sha256=sha256, size_bytes=size_bytes, created_at=utcnow()
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str, *, owner: str) -> Dataset:
    """The dataset if it exists and belongs to `owner`; `NotFound` otherwise (whoever else owns it)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner != owner:
        raise NotFound("dataset", dataset_id)
    return dataset


def list_datasets(session: Session, *, owner: str, limit: int = 50, offset: int = 0) -> list[Dataset]:
    """The owner's datasets, newest first."""
    query = (
        select(Dataset)
        .where(Dataset.owner == owner)
        .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


def jobs_reading(session: Session, reference: str, *, owner: str) -> list[str]:
    """Ids of the owner's queued or running jobs whose recipe data names `reference` (`dataset:<id>`):
    deleting the text under them would fail them when their stages read it."""
    active = session.scalars(select(Job).where(Job.owner == owner, Job.status.in_((Status.queued, Status.running))))
    return [job.id for job in active if reference in (job.recipe.get("data") or {}).values()]


def delete_dataset(session: Session, dataset_id: str, *, owner: str) -> Dataset:
    """Remove the owner's dataset row and return it (the caller removes the stored file)."""
    dataset = get_dataset(session, dataset_id, owner=owner)
    session.delete(dataset)
    session.flush()
    return dataset
