"""Artifacts: list a job's outputs and download one (HEAD, ranges, ETag), re-verified before it is served.

A download answers 409 with the reason when the stored bytes no longer match the recorded sha256 (the
artifact is then marked corrupt and stays refused), and 410 when they are gone from storage.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import streaming
from api.deps import CurrentUser, OwnedJob, SessionDep
from api.schemas import ArtifactPublic, ErrorBody
from api.views import artifact_public
from orchestrator import integrity
from orchestrator.night_report import REPORT_KIND
from orchestrator.store import queries
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Artifact, Job

router = APIRouter(tags=["artifacts"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_BODY = {streaming.FILE_TYPE: _BINARY, streaming.TAR_TYPE: _BINARY}
_HEADERS = {
    "ETag": {"description": "The artifact's sha256, quoted.", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "Always `bytes`.", "schema": {"type": "string"}},
    "Content-Length": {"description": "Bytes in this answer.", "schema": {"type": "integer"}},
    "X-Sparseflow-Sha256": {"description": "The sha256 (for a tar: of its checksums.json).",
                            "schema": {"type": "string"}},
    "X-Sparseflow-Format": {"description": "`file`, or `tar` for a directory.", "schema": {"type": "string"}},
}
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file (application/octet-stream), or a directory as an uncompressed tar "
                         "(application/x-tar) whose length is known up front.", "content": _BODY, "headers": _HEADERS},
    206: {"description": "One byte range (`Range: bytes=a-b`), see Content-Range.", "content": _BODY,
          "headers": {**_HEADERS, "Content-Range": {"description": "`bytes a-b/total`", "schema": {"type": "string"}}}},
    304: {"description": "`If-None-Match` matched the ETag."},
    404: {"description": "No such artifact for this owner.", "model": ErrorBody},
    409: {"description": "The stored bytes no longer match the sha256; the artifact is marked corrupt.",
          "model": ErrorBody},
    410: {"description": "The artifact's bytes are gone from storage.", "model": ErrorBody},
    412: {"description": "`If-Match` did not match the ETag."},
    416: {"description": "The range starts past the end; Content-Range gives the length.",
          "headers": {"Content-Range": {"description": "`bytes */total`", "schema": {"type": "string"}}}},
}


@router.get("/v1/jobs/{job_id}/artifacts", response_model=list[ArtifactPublic])
def list_artifacts(job: OwnedJob, session: SessionDep, kind: str | None = None) -> list[ArtifactPublic]:
    return [artifact_public(a) for a in queries.list_artifacts(session, job.id, kind=kind)]


def _owned(session: Session, artifact_id: str, user: str) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or session.scalar(select(Job.owner).where(Job.id == artifact.job_id)) != user:
        raise NotFound("artifact", artifact_id)
    return artifact


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, session: SessionDep, user: CurrentUser) -> ArtifactPublic:
    return artifact_public(_owned(session, artifact_id, user))


def intact(session: Session, artifact: Artifact) -> integrity.Snapshot:
    """The artifact's stored content, verified first: 409 with the reason if its bytes changed (it stays
    marked corrupt), 410 if they are gone."""
    try:
        snap = integrity.ensure_intact(session, artifact)
    except integrity.ArtifactCorrupt as error:
        session.commit()  # keep the corrupt mark although the answer is an error
        raise HTTPException(409, f"{error}; it is not served") from None
    except integrity.ArtifactMissing:
        raise HTTPException(410, f"artifact {artifact.id}: its content is gone from storage") from None
    session.commit()
    return snap


def _serve(method: str, request: Request, artifact_id: str, session: Session, user: str) -> Response:
    artifact = _owned(session, artifact_id, user)
    if artifact.stage_run_id is None and artifact.kind != REPORT_KIND:  # an input reference (a hub id, a path)
        raise NotFound("artifact", artifact_id)
    snap = intact(session, artifact)
    body = streaming.layout(snap.fs, snap.path, snap.entries, snap.is_dir)
    return streaming.respond(method, request.headers, body, artifact.sha256)


@router.get("/v1/artifacts/{artifact_id}/download", response_class=Response, responses=DOWNLOAD_RESPONSES)
def download_artifact(artifact_id: str, request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """The file, or a directory (a model) as a tar; `Range` for one byte range, ETag = sha256, re-verified."""
    return _serve("GET", request, artifact_id, session, user)


@router.head("/v1/artifacts/{artifact_id}/download", response_class=Response, responses=DOWNLOAD_RESPONSES)
def head_artifact(artifact_id: str, request: Request, session: SessionDep, user: CurrentUser) -> Response:
    """The download's headers (length, ETag, type) without its body."""
    return _serve("HEAD", request, artifact_id, session, user)
