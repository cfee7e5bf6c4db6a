"""The FastAPI application: `create_app()` builds it; the lifespan owns the orchestrator."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.limits import install_limits
from api.routers import artifacts, datasets, jobs, lineage, metrics, zoo
from api.status_cache import StatusCache
from orchestrator.integrity import verify_forever
from orchestrator.service import Orchestrator
from orchestrator.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app bound to `settings` (default: from the environment).

    Embedded mode runs jobs in this process; cluster mode only records them and creates Prefect flow runs.
    Either way the app reconciles at start and then periodically (jobs whose runner died are failed and,
    as their recipe allows, resumed) and re-hashes a few stored artifacts every `verify_every_s`.
    """

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        orchestrator = app.state.orchestrator = Orchestrator(settings)
        orchestrator.start_reconciler()
        verifier = asyncio.create_task(verify_forever(orchestrator.sessions, orchestrator.settings.verify_every_s))
        freeze_startup_heap()
        try:
            yield
        finally:
            gc.unfreeze()  # a process that goes on (a test session) collects them again
            verifier.cancel()
            orchestrator.close()

    app = FastAPI(
        title="sparseflow",
        summary="Compress language models: pruning, sparse fine-tuning, evaluation, kernel tuning.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.status_cache = StatusCache(settings.status_cache_s)
    install_error_handlers(app)
    install_limits(app, settings)
    for router in (jobs.router, artifacts.router, lineage.router, datasets.router, metrics.router, zoo.router):
        app.include_router(router)

    @app.get("/healthz", tags=["health"])
    async def health() -> dict[str, str]:  # async: no I/O, no thread hop
        return {"status": "ok"}

    return app


def freeze_startup_heap() -> None:
    """Take what is alive once the service has started out of the garbage collector's full passes.

    The imported stack (Prefect, Ray, SQLAlchemy, FastAPI) leaves about 200,000 objects that live as long
    as the process. A full collection walks all of them (80 ms on a 2-core VM) and the request path's own
    allocations set one off every few thousand requests, stalling every request in flight: it was most of
    the status endpoint's p99 and of `/healthz`'s. Frozen objects are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()
