"""The polled job status path, kept cheap: an async handler whose store reads take one thread hop.

Every client watching a job polls `GET /v1/jobs/{job_id}`. A sync handler with the usual dependencies
costs seven thread-pool hops per request (each sync dependency, the session's enter and exit, the
handler, and response validation); here the caller is resolved on the event loop (the same token check
as `api.deps.get_current_user`, which does no I/O) and the four store reads plus serialization run in one
hop. The body is the `JobDetail` model dumped once, not validated twice, and kept for a fraction of a
second for the other pollers of the same job (`api.status_cache`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from api import deps
from api.status_cache import StatusCache
from api.views import job_status
from orchestrator.service import Orchestrator

_bearer = HTTPBearer(auto_error=False)


async def polling_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """`api.deps.get_current_user`, resolved without leaving the event loop."""
    orchestrator = await deps.get_orchestrator(request)
    return await deps.get_current_user(await deps.get_app_settings(orchestrator), credentials)


PollingUser = Annotated[str, Depends(polling_user)]


def _status_json(orchestrator: Orchestrator, job_id: str, owner: str) -> bytes:
    with orchestrator.engine.connect() as connection:
        return job_status(connection, job_id, owner).model_dump_json().encode()


async def status_response(request: Request, job_id: str, owner: str) -> Response:
    """The job's `JobDetail` as JSON, at most `status_cache_s` old (`api.status_cache`); `NotFound` (unknown
    or another owner's job) propagates as 404."""
    orchestrator = await deps.get_orchestrator(request)
    cache: StatusCache = request.app.state.status_cache
    body = await cache.get((job_id, owner), lambda: run_in_threadpool(_status_json, orchestrator, job_id, owner))
    return Response(body, media_type="application/json")
