"""Domain exceptions mapped to HTTP answers in one place."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestrator.states import InvalidTransition
from orchestrator.store.errors import NotFound
from pipelines.recipe import RecipeError


def _json(status: int, detail: object) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> JSONResponse:
        return _json(404, str(error))

    @app.exception_handler(InvalidTransition)
    async def conflict(request: Request, error: InvalidTransition) -> JSONResponse:
        return _json(409, str(error))

    @app.exception_handler(RecipeError)
    async def bad_recipe(request: Request, error: RecipeError) -> JSONResponse:
        return _json(422, error.errors or str(error))

    @app.exception_handler(FileNotFoundError)
    async def missing_file(request: Request, error: FileNotFoundError) -> JSONResponse:
        return _json(410, f"artifact content is gone from storage: {error}")
