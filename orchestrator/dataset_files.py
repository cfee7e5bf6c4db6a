"""Where uploaded datasets are stored, and the checks their bytes pass on the way in.

Datasets live under the artifact root (any fsspec URL) at `datasets/<owner key>/<id>.txt`. The owner
key is a hash of the owner name, so a name never becomes a path component (no `..`, no slashes, no
case or length surprises). An upload is streamed: `DatasetWriter` checks size, NUL bytes and UTF-8
chunk by chunk while hashing and writing, so a large upload is never held in memory whole, and a
refused one is removed before the error is answered.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
from typing import Any

import fsspec

from orchestrator.settings import Settings


class DatasetRejected(ValueError):
    """The uploaded bytes are not acceptable text; the message says why (no excerpt of the bytes)."""


class DatasetTooLarge(DatasetRejected):
    """The upload exceeds `Settings.max_dataset_bytes`."""


def owner_key(owner: str) -> str:
    """A fixed-length, path-safe stand-in for an owner name."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


def dataset_uri(settings: Settings, *, owner: str, dataset_id: str) -> str:
    """The storage URI of the owner's dataset `dataset_id` (an id the service generated)."""
    return f"{settings.artifacts_url.rstrip('/')}/datasets/{owner_key(owner)}/{dataset_id}.txt"


class DatasetWriter:
    """Writes one upload to `uri`, refusing it as soon as it is too large, has a NUL byte or is not UTF-8."""

    def __init__(self, uri: str, limit: int) -> None:
        self.uri = uri
        self.limit = limit
        self.size = 0
        self._sha = hashlib.sha256()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fs, self._path = fsspec.core.url_to_fs(uri)
        self._fs.makedirs(self._fs._parent(self._path), exist_ok=True)
        self._file: Any = self._fs.open(self._path, "wb")

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.size + len(chunk) > self.limit:
            raise DatasetTooLarge(f"dataset is larger than the limit of {self.limit} bytes")
        if b"\x00" in chunk:
            raise DatasetRejected(f"dataset contains a NUL byte (at byte {self.size + chunk.index(0)}); "
                                  "it must be UTF-8 text")
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise DatasetRejected(f"dataset is not UTF-8 text (invalid byte at {self.size + error.start})") from None
        self._sha.update(chunk)
        self._file.write(chunk)
        self.size += len(chunk)

    def finish(self) -> tuple[str, int]:
        """Close the file once everything arrived; (sha256, size). Refuses an empty or truncated text."""
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DatasetRejected("dataset is not UTF-8 text (it ends inside a character)") from None
        if self.size == 0:
            raise DatasetRejected("dataset is empty")
        self._file.close()
        return self._sha.hexdigest(), self.size

    def discard(self) -> None:
        """Drop what was written (a refused or failed upload leaves nothing behind)."""
        try:
            self._file.close()
        finally:
            remove(self.uri)


def remove(uri: str) -> None:
    """Delete a stored dataset file; one already gone is fine."""
    fs, path = fsspec.core.url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
