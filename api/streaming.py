"""Serving artifacts out of fsspec storage: HEAD, GET, single byte ranges, ETag, without buffering.

A file is served as itself. A directory (a saved model) is served as an uncompressed POSIX tar built on
the fly. Its layout (members in sorted order, each a header block, the bytes, zero padding to 512, then
two zero blocks) is computed up front from the member sizes, so the tar has a `Content-Length` before
the first byte is sent and a byte range of it maps straight onto one member and an offset: a resumed
download of a multi-GB model seeks into the right file instead of re-reading the ones before it.

Conditional requests follow RFC 9110: the ETag is the artifact's sha256 (quoted; for a directory the
digest of its `checksums.json` manifest), `If-None-Match` answers 304, `If-Match` 412, and an `If-Range`
that no longer matches turns a range request into a full 200. A `Range` with several ranges, or one
that does not parse, is ignored (a full 200, as the RFC allows); one that starts past the end is 416.
"""

from __future__ import annotations

import bisect
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec

if TYPE_CHECKING:
    from starlette.responses import Response

CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
TAR_TYPE = "application/x-tar"
FILE_TYPE = "application/octet-stream"
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Segment:
    """A stretch of the body: literal bytes (a tar header or padding) or the content of one file."""

    offset: int
    size: int
    data: bytes | None = None
    path: str | None = None


@dataclass(frozen=True)
class Body:
    """What a download sends: its segments, total length, media type and suggested file name."""

    fs: fsspec.AbstractFileSystem
    segments: tuple[Segment, ...]
    length: int
    media_type: str
    filename: str

    @property
    def is_tar(self) -> bool:
        return self.media_type == TAR_TYPE

    def iter_bytes(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Bytes `[start, stop)` of the body; file segments are opened and seeked, never read from 0."""
        stop = self.length if stop is None else stop
        first = max(bisect.bisect_right([s.offset for s in self.segments], start) - 1, 0)
        for segment in self.segments[first:]:
            if segment.offset >= stop:
                break
            lo = max(start, segment.offset) - segment.offset
            hi = min(stop, segment.offset + segment.size) - segment.offset
            if hi <= lo:
                continue
            if segment.data is not None:
                yield segment.data[lo:hi]
            else:
                yield from _file_slice(self.fs, segment.path or "", lo, hi)


def _file_slice(fs: fsspec.AbstractFileSystem, path: str, lo: int, hi: int) -> Iterator[bytes]:
    """Bytes `[lo, hi)` of one file; a file that shrank since it was listed ends the stream with an error
    (the client then sees a short body) rather than sending fewer bytes than `Content-Length` promised."""
    with fs.open(path, "rb") as handle:
        handle.seek(lo)
        left = hi - lo
        while left:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"artifact member shrank while being served ({left} bytes short)")
            left -= len(chunk)
            yield chunk


def _tar_header(name: str, size: int) -> bytes:
    """A deterministic member header: fixed mode, owner and mtime, so the same files give the same tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.PAX_FORMAT)


def layout(fs: fsspec.AbstractFileSystem, path: str, entries: Mapping[str, Mapping[str, Any]], is_dir: bool) -> Body:
    """The body for the artifact at `path`, given its listing (file path -> fsspec info with `size`).

    A directory becomes a tar whose members are named `<directory name>/<relative path>`.
    """
    name = PurePosixPath(path).name
    if not is_dir:
        size = int(entries[path]["size"])
        return Body(fs, (Segment(0, size, path=path),), size, FILE_TYPE, name)
    segments: list[Segment] = []
    offset = 0

    def add(segment_size: int, data: bytes | None = None, file: str | None = None) -> None:
        nonlocal offset
        segments.append(Segment(offset, segment_size, data=data, path=file))
        offset += segment_size

    for member in sorted(entries):
        size = int(entries[member]["size"])
        header = _tar_header(f"{name}/{PurePosixPath(member).relative_to(path)}", size)
        add(len(header), data=header)
        if size:
            add(size, file=member)
        if size % _BLOCK:
            add(_BLOCK - size % _BLOCK, data=b"\0" * (_BLOCK - size % _BLOCK))
    add(2 * _BLOCK, data=b"\0" * (2 * _BLOCK))
    return Body(fs, tuple(segments), offset, TAR_TYPE, f"{name}.tar")


def tar_stream(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[bytes]:
    """The whole tar of directory `root`, as a download of it would stream it."""
    return layout(fs, root, fs.find(root, detail=True), is_dir=True).iter_bytes()


def parse_range(header: str | None, length: int) -> tuple[int, int] | None | bool:
    """`(start, stop)` for one satisfiable byte range; None to send everything; False if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None  # several ranges, another unit, or nonsense: ignored, the whole body is sent
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        return (max(length - suffix, 0), length) if suffix and length else False
    start = int(first)
    if start >= length:
        return False
    stop = min(int(last) + 1, length) if last else length
    return (start, stop) if stop > start else None


def _etag_matches(header: str, etag: str | None) -> bool:
    if etag is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def _content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=utf-8''{quote(filename)}"


def respond(method: str, request_headers: Mapping[str, str], body: Body, sha256: str | None) -> Response:
    """The answer to a HEAD or GET of `body` whose content has digest `sha256` (its strong ETag)."""
    from starlette.responses import Response, StreamingResponse  # here: the CLI's local download needs no server

    etag = f'"{sha256}"' if sha256 else None
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": _content_disposition(body.filename),
        "X-Sparseflow-Format": "tar" if body.is_tar else "file",
        "X-Sparseflow-Sha256": sha256 or "",
    }
    if etag:
        headers["ETag"] = etag
    if_match = request_headers.get("if-match")
    if if_match and not _etag_matches(if_match, etag):
        return Response(status_code=412, headers=headers)
    if_none_match = request_headers.get("if-none-match")
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    wanted = parse_range(request_headers.get("range"), body.length)
    if_range = request_headers.get("if-range")
    if wanted is not None and if_range and (etag is None or if_range.strip() != etag):
        wanted = None  # the client's partial copy is of other bytes: start over with the whole body
    if wanted is False:
        headers["Content-Range"] = f"bytes */{body.length}"
        return Response(status_code=416, headers=headers)
    start, stop = wanted if isinstance(wanted, tuple) else (0, body.length)
    status = 206 if isinstance(wanted, tuple) else 200
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{body.length}"
    headers["Content-Length"] = str(stop - start)
    if method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=body.media_type)
    return StreamingResponse(body.iter_bytes(start, stop), status_code=status, headers=headers,
                             media_type=body.media_type)
