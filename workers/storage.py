"""Artifact storage through fsspec: a local directory by default, any fsspec URL (s3://...) alike.

A stage writes its outputs into a scratch directory; `ArtifactStorage.put` moves each one under
`<root>/<job_id>/<stage label>/<name>` and returns its URI, sha256 and size. A directory artifact (a
model) gets a `checksums.json` manifest (sha256 of every file) written into it, and the artifact's
sha256 is the digest of that manifest, so one value pins every byte of the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "checksums.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredArtifact:
    kind: str
    uri: str
    sha256: str
    size_bytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> tuple[str, int]:
    """Write `checksums.json` (relative path -> sha256) into `directory`; return (its digest, total size)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    text = json.dumps({"algorithm": "sha256", "files": entries}, indent=1, sort_keys=True)
    (directory / MANIFEST).write_text(text)
    size = sum(p.stat().st_size for p in files) + len(text.encode())
    return hashlib.sha256(text.encode()).hexdigest(), size


def verify_manifest(directory: Path) -> list[str]:
    """Paths in `directory` whose content no longer matches its manifest (empty list: intact)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return [
        name
        for name, digest in manifest["files"].items()
        if not (directory / name).is_file() or sha256_file(directory / name) != digest
    ]


class ArtifactStorage:
    """Puts stage outputs under one root URL and brings them back as local paths."""

    def __init__(self, root: str, local_cache: Path) -> None:
        self.root = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.local_cache = local_cache

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def put(self, local: Path, *, job_id: str, label: str, kind: str) -> StoredArtifact:
        """Store `local` (file or directory) for `job_id`; local roots move it, remote roots upload it."""
        if local.is_dir():
            sha, size = write_manifest(local)
        else:
            sha, size = sha256_file(local), local.stat().st_size
        target = f"{self._root_path}/{job_id}/{label}/{local.name}"
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            if Path(target).exists():
                shutil.rmtree(target) if Path(target).is_dir() else Path(target).unlink()
            shutil.move(str(local), target)
        else:
            self.fs.put(str(local), target, recursive=local.is_dir())
        return StoredArtifact(kind=kind, uri=self.fs.unstrip_protocol(target), sha256=sha, size_bytes=size)

    def local_path(self, uri: str) -> Path:
        """A local path holding the artifact at `uri`: the file itself for local storage, else a cached copy."""
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            if not Path(path).exists():
                raise FileNotFoundError(f"artifact missing from storage: {uri}")
            return Path(path)
        cached = self.local_cache / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(path).name
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            fs.get(path, str(cached), recursive=fs.isdir(path))
        return cached

    def open(self, uri: str, mode: str = "rb"):
        """Open a file artifact for streaming (the API's download path)."""
        return fsspec.open(uri, mode).open()
