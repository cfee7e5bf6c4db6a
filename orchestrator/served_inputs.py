"""Inputs and outputs the lineage store itself takes part in, looked up by artifact kind.

A stage declares the store-served inputs it reads (`store_inputs` on its recipe class, e.g. the
kernel-plan cache of `kernel_tune`); the flow asks the provider registered here for each, records the
result as an ordinary input artifact, and needs no stage-specific code. Likewise an output whose kind
has a recorder here (a `kernel_plan`) is fed back into the store after its stage succeeds.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from orchestrator.store.models import Artifact
from workers.storage import ArtifactStorage

Provider = Callable[..., Artifact]
"""`provider(session, storage, *, job_id, label) -> Artifact` (a source artifact of the job)."""
Recorder = Callable[..., int]
"""`recorder(session, storage, *, stage_run_id, uri) -> int` (rows written)."""

def _kernel_cache(session: Session, storage: ArtifactStorage, *, job_id: str, label: str) -> Artifact:
    from orchestrator.kernel_cache import provide_kernel_cache  # loads the kernel stack: only when asked

    return provide_kernel_cache(session, storage, job_id=job_id, label=label)


def _remember_plan(session: Session, storage: ArtifactStorage, *, stage_run_id: str, uri: str) -> int:
    from orchestrator.kernel_cache import remember_kernel_plan

    return remember_kernel_plan(session, storage, stage_run_id=stage_run_id, plan_uri=uri)


PROVIDERS: dict[str, Provider] = {"kernel_cache": _kernel_cache}
RECORDERS: dict[str, Recorder] = {"kernel_plan": _remember_plan}


def provide(kind: str, session: Session, storage: ArtifactStorage, *, job_id: str, label: str) -> Artifact:
    if kind not in PROVIDERS:
        raise KeyError(f"no store provider for input kind {kind!r}; known: {sorted(PROVIDERS)}")
    return PROVIDERS[kind](session, storage, job_id=job_id, label=label)


def record(kind: str, session: Session, storage: ArtifactStorage, *, stage_run_id: str, uri: str) -> None:
    recorder = RECORDERS.get(kind)
    if recorder is not None:
        recorder(session, storage, stage_run_id=stage_run_id, uri=uri)
