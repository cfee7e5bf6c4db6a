"""Domain exceptions mapped to HTTP answers in one place."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.excerpts import MESSAGE_CHARS, cut, short_errors
from orchestrator.access import AccessDenied
from orchestrator.service import DispatchFailed
from orchestrator.states import InvalidTransition, Status
from orchestrator.store.errors import NotFound
from pipelines.recipe import RecipeError


def _json(status: int, detail: object) -> JSONResponse:
    # a message may quote what the client sent (an id, a path): never more than an excerpt of it
    if isinstance(detail, str):
        detail = cut(detail, MESSAGE_CHARS)
    return JSONResponse(status_code=status, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> JSONResponse:
        return _json(404, str(error))

    @app.exception_handler(AccessDenied)
    async def access_denied(request: Request, error: AccessDenied) -> JSONResponse:
        return _json(error.status_code, str(error))

    @app.exception_handler(DispatchFailed)
    async def not_dispatched(request: Request, error: DispatchFailed) -> JSONResponse:
        return _json(503, f"the job was recorded but could not be handed to a runner: {cut(str(error), MESSAGE_CHARS)}")

    @app.exception_handler(InvalidTransition)
    async def conflict(request: Request, error: InvalidTransition) -> JSONResponse:
        hint = ""
        if (request.url.path.endswith("/resume") and error.entity == "job"
                and error.current in (Status.queued, Status.running)):  # recorded live: its runner may be dead
            hint = ("; if its runner died, take it over with POST .../resume?force=true "
                    "(CLI: sparseflow resume --force)")
        return _json(409, f"{error}{hint}")

    @app.exception_handler(RecipeError)
    async def bad_recipe(request: Request, error: RecipeError) -> JSONResponse:
        return _json(422, short_errors(error.errors) if error.errors else str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes every input whole (a 50 MB name came back as a 52 MB error) and fails
        # on NaN; the field path and reason stay, the inputs shrink to short excerpts
        return _json(422, short_errors(error.errors()))

    @app.exception_handler(FileNotFoundError)
    async def missing_file(request: Request, error: FileNotFoundError) -> JSONResponse:
        return _json(410, f"artifact content is gone from storage: {error}")
