"""Limits every request meets before a handler sees it: a bounded body and a URL without NUL.

`RequestLimits` is pure ASGI middleware. A body whose declared `Content-Length` is over the limit is
answered 413 at once, unread. A body sent without a length (chunked) is counted as it streams in, and
the read that crosses the limit raises `BodyTooLarge`, an HTTPException, so FastAPI answers 413 before
it parses anything: the body is never held in memory beyond the limit. Paths that take larger bodies
(dataset uploads) get their own limit through `path_limits`.

NUL in a path or query parameter is answered 422 here, once for every endpoint: no id, name or
filter contains one, and PostgreSQL rejects it with an error that would otherwise be a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.settings import Settings

DATASETS_PATH = "/v1/datasets"


class BodyTooLarge(HTTPException):
    """A request body over its path's limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body is larger than the limit of {limit} bytes for this endpoint; send less"
        )
        self.limit = limit


def _nul_location(scope: Scope) -> list[str] | None:
    """`loc` of the first NUL character in the URL (["path"] or ["query", name]), else None."""
    if "\x00" in scope.get("path", ""):
        return ["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query or "\x00" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return ["query", name.replace("\x00", "\\x00")[:200]]
    return None


class RequestLimits:
    """ASGI middleware enforcing the body size limit (per path) and NUL-free URLs."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, path_limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = {path.rstrip("/") or "/": limit for path, limit in (path_limits or {}).items()}

    def limit_for(self, path: str) -> int:
        return self.path_limits.get(path.rstrip("/") or "/", self.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = _nul_location(scope)
        if where is not None:
            detail = [{"type": "value_error", "loc": where, "msg": "must not contain NUL (\\x00) characters"}]
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as error:  # raised outside FastAPI's handlers (e.g. a raw streaming route)
            if started:
                raise
            await _too_large(error.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": BodyTooLarge(limit).detail}, status_code=413, headers={"Connection": "close"})


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Bound request bodies by `max_request_bytes` (dataset uploads: `max_dataset_bytes`)."""
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_request_bytes,
        path_limits={DATASETS_PATH: settings.max_dataset_bytes},
    )
