"""Request dependencies: settings, the orchestrator, a database session, the current user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from orchestrator.service import Orchestrator
from orchestrator.settings import Settings
from orchestrator.store import queries
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Job

_bearer = HTTPBearer(auto_error=False)


async def get_orchestrator(request: Request) -> Orchestrator:  # async: no I/O, no thread hop
    return request.app.state.orchestrator


OrchestratorDep = Annotated[Orchestrator, Depends(get_orchestrator)]


async def get_app_settings(orchestrator: OrchestratorDep) -> Settings:
    return orchestrator.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(orchestrator: OrchestratorDep) -> Iterator[Session]:
    """One session per request; handlers that write commit before answering, errors roll back."""
    session = orchestrator.sessions()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_current_user(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The owner name for the bearer token; 'local' when the service runs without tokens."""
    if not settings.api_tokens:
        return "local"
    if credentials is None or credentials.credentials not in settings.api_tokens:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return settings.api_tokens[credentials.credentials]


CurrentUser = Annotated[str, Depends(get_current_user)]


def get_owned_job(job_id: str, session: SessionDep, user: CurrentUser) -> Job:
    """The job, if it exists and belongs to the caller (another owner's job reads as not found)."""
    job = queries.get_job(session, job_id)
    if job.owner != user:
        raise NotFound("job", job_id)
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
