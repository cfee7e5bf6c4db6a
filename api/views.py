"""Turning store rows into response bodies (kept out of the handlers so they stay short)."""

from __future__ import annotations

from pathlib import PurePosixPath

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from api.reuse import reused_from
from api.schemas import ArtifactPublic, JobDetail, StageRunPublic
from orchestrator.store import reads
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Artifact, Job

HEADLINE_METRICS = (
    "perplexity", "dense_perplexity", "sparsity", "param_count", "nonzero_params", "model_size_bytes",
    "stage_seconds", "prune_time_s", "peak_gpu_mem_bytes", "calibration_tokens", "loss", "tokens_per_s",
    "kernel_tuned_shapes", "kernel_cached_shapes", "act_dense_ppl", "weight_sparsity",
)
"""What the job status carries per stage (at most these 16, each its last value); every other metric,
per-layer values and time series included, is paged under `GET /v1/jobs/{job_id}/metrics`."""


def artifact_name(uri: str) -> str:
    """The artifact's file or directory name: the last path component of its storage URI."""
    return PurePosixPath(uri.rstrip("/")).name or uri.rsplit(":", 1)[-1]


def artifact_public(artifact: Artifact) -> ArtifactPublic:
    return ArtifactPublic(
        id=artifact.id,
        job_id=artifact.job_id,
        stage_run_id=artifact.stage_run_id,
        kind=artifact.kind,
        name=artifact_name(artifact.uri),
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        created_at=artifact.created_at,
        verified_at=artifact.verified_at,
        corrupt_reason=artifact.corrupt_reason,
        download_url=f"/v1/artifacts/{artifact.id}/download" if artifact.stage_run_id is not None else None,
    )


def _stages(db: Session | Connection, job_id: str) -> tuple[list[StageRunPublic], list[str]]:
    """The job's stages with their headline metrics and notes, and the job's own notes (no stage)."""
    metrics = reads.last_metric_values(db, job_id, HEADLINE_METRICS)
    notes = reads.notes(db, job_id)
    origins = reused_from(db, job_id)  # the stage cache stays within one owner: these are the caller's jobs
    stages = [
        StageRunPublic(**row._mapping, metrics=metrics.get(row.id, {}), notes=notes.get(row.id, []),
                       reused_from_job=origins.get(row.id))
        for row in reads.stage_rows(db, job_id)
    ]
    return stages, notes.get(None, [])


def job_detail(session: Session, job: Job) -> JobDetail:
    """A job with its stages, each carrying its headline metrics' last values and its notes."""
    base = {column: getattr(job, column) for column in reads.JOB_COLUMNS}
    stages, notes = _stages(session, job.id)
    return JobDetail(**base, stages=stages, notes=notes)


def job_status(db: Session | Connection, job_id: str, owner: str) -> JobDetail:
    """`job_detail` for the polled status path: four column-only queries, no ORM objects loaded.

    Another owner's job reads as not found, as an unknown one does.
    """
    row = reads.job_row(db, job_id)
    if row is None or row.owner != owner:
        raise NotFound("job", job_id)
    stages, notes = _stages(db, job_id)
    return JobDetail(**row._mapping, stages=stages, notes=notes)
