"""Which job a stage-cache hit reused: read from the store for the CLI's summaries.

A stage run served from the stage cache (`orchestrator.caching.reuse_cached`) carries a `cached_from` tag
naming the stage run whose outputs and metrics it copied, its `stage_seconds` included. A summary that
printed those seconds would say the stage ran again; it names the job that really ran it instead. That
stage run may itself have been a cache hit, so the chain is followed to the run that computed the outputs.
"""

from __future__ import annotations

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from orchestrator.store.models import StageRun, Tag

CACHED_FROM = "cached_from"
_stage_runs, _tags = StageRun.__table__.c, Tag.__table__.c  # Core columns: no ORM compile state (reads.py)
_MAX_HOPS = 64  # a chain of cache hits, each of an earlier run: far longer than any real one


def reused_from(session: Session | Connection, job_id: str) -> dict[str, str]:
    """Stage run id -> id of the job that computed what it reused, for each of `job_id`'s cache hits.

    A reused run whose origin is gone from the store (its job deleted) maps to the last job still known,
    or to "" when none is.
    """
    hits = dict(session.execute(
        select(_tags.stage_run_id, _tags.value).where(_tags.job_id == job_id, _tags.key == CACHED_FROM)).all())
    found: dict[str, str] = {}
    for stage_run_id, source in hits.items():
        origin_job = ""
        for _ in range(_MAX_HOPS):
            row = session.execute(select(_stage_runs.job_id).where(_stage_runs.id == source)).first()
            if row is None:
                break
            origin_job = row.job_id
            earlier = session.scalar(select(_tags.value).where(_tags.stage_run_id == source, _tags.key == CACHED_FROM))
            if earlier is None:
                break
            source = earlier
        if stage_run_id is not None:
            found[stage_run_id] = origin_job
    return found
