"""Artifacts: list a job's outputs and download one, streamed, with its sha256."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, OwnedJob, SessionDep, SettingsDep
from api.schemas import ArtifactPublic
from api.streaming import stream_artifact
from api.views import artifact_public
from orchestrator.store import queries
from orchestrator.store.errors import NotFound

router = APIRouter(tags=["artifacts"])


@router.get("/v1/jobs/{job_id}/artifacts", response_model=list[ArtifactPublic])
def list_artifacts(job: OwnedJob, session: SessionDep, kind: str | None = None) -> list[ArtifactPublic]:
    return [artifact_public(a) for a in queries.list_artifacts(session, job.id, kind=kind)]


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, session: SessionDep, user: CurrentUser) -> ArtifactPublic:
    artifact = queries.get_artifact(session, artifact_id)
    if queries.get_job(session, artifact.job_id).owner != user:
        raise NotFound("artifact", artifact_id)
    return artifact_public(artifact)


@router.get("/v1/artifacts/{artifact_id}/download")
def download_artifact(artifact_id: str, session: SessionDep, user: CurrentUser, settings: SettingsDep
                      ) -> StreamingResponse:
    """The file itself, or a directory (a model) as an uncompressed tar; `X-Sparseflow-Sha256` pins it."""
    artifact = queries.get_artifact(session, artifact_id)
    if queries.get_job(session, artifact.job_id).owner != user or artifact.stage_run_id is None:
        raise NotFound("artifact", artifact_id)
    return stream_artifact(artifact.uri, artifact.sha256)
