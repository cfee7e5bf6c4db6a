"""The FastAPI application: `create_app()` builds it; the lifespan owns the orchestrator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routers import artifacts, jobs, lineage, metrics
from orchestrator.service import Orchestrator
from orchestrator.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app bound to `settings` (default: from the environment), running jobs in-process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.orchestrator = Orchestrator(settings or get_settings())
        try:
            yield
        finally:
            app.state.orchestrator.close()

    app = FastAPI(
        title="sparseflow",
        summary="Compress language models: pruning, sparse fine-tuning, evaluation, kernel tuning.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for router in (jobs.router, artifacts.router, lineage.router, metrics.router):
        app.include_router(router)

    @app.get("/healthz", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
