"""An artifact's download body read straight from storage, for `Download` without an HTTP server.

`api.download.Download` asks its transport for `stream("GET", url, headers)` and reads the answer as
httpx would give it: a status, the `X-Sparseflow-*` headers and the bytes. `LocalBody` answers the same
way from the artifact's storage, laid out by `api.streaming` exactly as the API serves it (a file as
itself, a directory as its tar), so the embedded `sparseflow download` verifies and installs through the
same code as a download over HTTP, a resumed part file and its `Range`/`If-Range` included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from api import streaming


@dataclass
class LocalResponse:
    """What `Download` reads of an httpx response."""

    status_code: int
    headers: dict[str, str]
    body: streaming.Body | None = None
    span: tuple[int, int] = (0, 0)

    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]:
        if self.body is not None:
            yield from self.body.iter_bytes(*self.span)

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())


@dataclass
class LocalBody:
    """The transport `Download` streams one artifact from; built by `open` after the integrity check."""

    body: streaming.Body
    sha256: str | None

    @classmethod
    def open(cls, session: Any, artifact: Any) -> LocalBody:
        """Re-check the stored bytes as the API does before serving them (`integrity.ensure_intact`: raises
        `ArtifactCorrupt`, recording it on the row, or `ArtifactMissing`)."""
        from orchestrator import integrity

        snap = integrity.ensure_intact(session, artifact)
        return cls(streaming.layout(snap.fs, snap.path, snap.entries, snap.is_dir), artifact.sha256)

    @contextmanager
    def stream(self, method: str, url: str, headers: dict[str, str] | None = None) -> Iterator[LocalResponse]:
        """The answer to a GET of the download URL: 200 with everything, 206 with a range the part file
        asks for while its `If-Range` still names these bytes, 416 for a range past the end."""
        headers = headers or {}
        common = {"X-Sparseflow-Format": "tar" if self.body.is_tar else "file",
                  "X-Sparseflow-Sha256": self.sha256 or ""}
        span = streaming.parse_range(headers.get("Range"), self.body.length)
        if_range = headers.get("If-Range")
        if span is not None and if_range is not None and if_range != f'"{self.sha256}"':
            span = None  # the part holds other bytes: everything again, as RFC 9110 has it
        if span is False:
            yield LocalResponse(416, {"Content-Range": f"bytes */{self.body.length}"})
            return
        if span is None:
            yield LocalResponse(200, common, self.body, (0, self.body.length))
            return
        start, stop = span
        yield LocalResponse(206, {**common, "Content-Range": f"bytes {start}-{stop - 1}/{self.body.length}"},
                            self.body, (start, stop))
