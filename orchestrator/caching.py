"""Stage caching by content: the same stage on the same inputs with the same code is not run twice.

The key hashes the stage's parameters, the job's data sources and seed, the sha256 of every input
artifact (or the reference of a source model), and the code version. A hit reuses the earlier stage
run's outputs (any job's) if they are still in storage; the reuse is recorded as a tag and as new
artifact rows of this job pointing at the same content, so lineage stays per job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
from sqlalchemy.orm import Session

from orchestrator.store import queries
from orchestrator.store.models import Artifact


def stage_cache_key(*, kind: str, params: dict[str, Any], data: dict[str, Any], seed: int,
                    inputs: dict[str, Artifact], code_version: str) -> str:
    content = {
        "kind": kind,
        "params": params,
        "data": data,
        "seed": seed,
        "inputs": {k: a.sha256 or a.uri for k, a in sorted(inputs.items())},
        "code": code_version,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _still_stored(uri: str) -> bool:
    if uri.startswith("source:"):
        return True
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def reuse_cached(session: Session, *, job_id: str, stage_run_id: str, cache_key: str) -> list[Artifact] | None:
    """Copy a cached stage run's outputs onto `stage_run_id`; None when there is nothing usable."""
    cached = queries.find_cached_stage(session, cache_key)
    if cached is None or cached.id == stage_run_id:
        return None
    outputs = queries.stage_outputs(session, cached.id)
    if not outputs or not all(_still_stored(a.uri) for a in outputs):
        return None
    reused = [
        queries.add_artifact(session, job_id=job_id, stage_run_id=stage_run_id, kind=a.kind, uri=a.uri,
                             sha256=a.sha256, size_bytes=a.size_bytes)
        for a in outputs
    ]
    queries.add_metrics(session, job_id=job_id, stage_run_id=stage_run_id,
                        metrics=[(m.name, m.value, m.step) for m in cached.metrics])
    queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="cached_from", value=cached.id)
    return reused
