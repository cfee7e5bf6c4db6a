"""Streaming artifacts out of fsspec storage without loading them into memory.

A file streams as itself. A directory (a saved model) streams as an uncompressed POSIX tar built on
the fly, member by member, so a multi-GB model needs no temporary archive.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
from fastapi.responses import StreamingResponse

_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


def _file_chunks(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[bytes]:
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def tar_stream(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[bytes]:
    """Yield a tar of directory `root`, members named `<root name>/<relative path>`, in sorted order."""
    base = PurePosixPath(root).name
    files = sorted(p for p in fs.find(root) if fs.isfile(p))
    for path in files:
        info = tarfile.TarInfo(f"{base}/{PurePosixPath(path).relative_to(root)}")
        info.size = fs.size(path)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from _file_chunks(fs, path)
        if info.size % _BLOCK:
            yield b"\0" * (_BLOCK - info.size % _BLOCK)
    yield b"\0" * (2 * _BLOCK)


def stream_artifact(uri: str, sha256: str | None) -> StreamingResponse:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(uri)
    name = PurePosixPath(path).name
    headers = {"X-Sparseflow-Sha256": sha256 or ""}
    if fs.isdir(path):
        headers["Content-Disposition"] = f'attachment; filename="{name}.tar"'
        headers["X-Sparseflow-Format"] = "tar"
        return StreamingResponse(tar_stream(fs, path), media_type="application/x-tar", headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{name}"'
    headers["Content-Length"] = str(fs.size(path))
    headers["X-Sparseflow-Format"] = "file"
    return StreamingResponse(_file_chunks(fs, path), media_type="application/octet-stream", headers=headers)
