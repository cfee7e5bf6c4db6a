"""The kernel plan cache around a `kernel_tune` stage: hand it what was measured, keep what it measures.

Before the stage, `provide_kernel_cache` writes every cached kernel choice from the store into a
`kernel_cache` JSON artifact (a source artifact of the job, no producing stage run) that the flow
passes as the stage's `kernel_cache` input, so lineage shows which measurements a plan reused. After
the stage succeeds, `remember_kernel_plan` reads the `kernel_plan` it produced and stores its newly
measured choices, keyed by environment, dtype, shape and token count, so the nightly job does not
time unchanged shapes again. A plan measured without a GPU, and choices without timings, are not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from kernels.plan import load_plan
from orchestrator.store import queries
from orchestrator.store.models import Artifact
from pipelines.stages.kernel_tune import KernelCache, KernelCacheEntry
from workers.storage import ArtifactStorage

log = logging.getLogger(__name__)

CACHE_KIND = "kernel_cache"


def provide_kernel_cache(session: Session, storage: ArtifactStorage, *, job_id: str, label: str) -> Artifact:
    """Store every cached choice as `<job>/<label>/kernel_cache-<sha>.json` and record it as an artifact."""
    rows = queries.cached_kernel_choices(session)
    cache = KernelCache(entries=[
        KernelCacheEntry(environment=row.environment(), dtype=row.dtype, shape=row.shape, tokens=row.tokens,
                         choice=row.choice)
        for row in rows
    ])
    text = json.dumps(cache.model_dump(mode="json"), indent=1) + "\n"
    # content-addressed name: a retried stage writes the same bytes to the same place
    name = f"kernel_cache-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    with tempfile.TemporaryDirectory(prefix="sparseflow-kernel-cache-") as scratch:
        path = Path(scratch) / name
        path.write_text(text)
        stored = storage.put(path, job_id=job_id, label=label, kind=CACHE_KIND)
    log.info("kernel cache for job %s: %d cached choices", job_id, len(rows))
    return queries.add_artifact(session, job_id=job_id, kind=CACHE_KIND, uri=stored.uri, sha256=stored.sha256,
                                size_bytes=stored.size_bytes)


def remember_kernel_plan(session: Session, storage: ArtifactStorage, *, stage_run_id: str, plan_uri: str) -> int:
    """Store the measured choices of the plan at `plan_uri` that the cache does not already hold.

    A choice equal to the cached one was reused, not measured, by this run: its row keeps the stage
    run that measured it. Return how many choices were written.
    """
    plan = load_plan(storage.local_path(plan_uri))
    if plan.environment.gpu is None:
        return 0
    environment = plan.environment.model_dump()
    known = {(row.shape, row.tokens): row.choice
             for row in queries.cached_kernel_choices(session, environment=environment, dtype=plan.dtype)}
    entries = []
    for key, shape in plan.shapes.items():
        for tokens, choice in shape.choices.items():
            dump = choice.model_dump(mode="json")
            if choice.times_ms and known.get((key, tokens)) != dump:
                entries.append((key, tokens, dump))
    written = queries.upsert_kernel_choices(session, stage_run_id=stage_run_id, environment=environment,
                                            dtype=plan.dtype, entries=entries)
    log.info("kernel cache: %d choices of stage run %s stored", written, stage_run_id)
    return written
