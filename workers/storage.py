"""Artifact storage through fsspec: a local directory by default, any fsspec URL (s3://...) alike.

A stage writes its outputs into a scratch directory; `ArtifactStorage.put` stores each one under
`<root>/<job_id>/<stage label>/<name>` and returns its URI, sha256 and size. A directory artifact (a
model) gets a `checksums.json` manifest (sha256 of every file) written into it, and the artifact's
sha256 is the digest of that manifest, so one value pins every byte of the model.

No reader ever sees half an artifact:

- local root: the artifact is moved (or copied, across filesystems) into a hidden sibling of its
  target and renamed into place, so a kill leaves either nothing or the whole artifact there;
- remote root: a file is one object PUT (object stores make it visible only once complete); a
  directory's files are uploaded first and its manifest last, and a remote directory without its
  manifest counts as absent (`local_path` says "incomplete"; `orchestrator.integrity` finds it corrupt).

`local_path` brings a remote artifact into the node's local cache, keyed by the URI and the remote
version (the manifest's digest for a directory, fsspec's `ukey` for a file), downloading into a temp
name first and checking a directory against its manifest before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines.filemodes import normalize_modes

MANIFEST = "checksums.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredArtifact:
    kind: str
    uri: str
    sha256: str
    size_bytes: int


class IncompleteArtifactError(FileNotFoundError):
    """A directory artifact without its manifest: an upload that never finished."""


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


def _local_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def remove_local(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_local(source: Path, target: Path) -> None:
    """Put `source` (same filesystem as `target`) at `target` by renames only, replacing what was there.

    A directory cannot be renamed over a non-empty one, so the old target is renamed aside first and
    deleted after: a reader sees the old tree, briefly nothing, then the new tree, never a mix.
    """
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(source, target)
    remove_local(old)


def upload_dir(fs: fsspec.AbstractFileSystem, local: Path, target: str, *, last: str | None = None) -> None:
    """Upload every file under `local` to `target/<relative path>`, the file named `last` after all others."""
    files = sorted(_local_files(local), key=lambda p: p == local / last if last else False)  # stable: order kept
    fs.makedirs(target, exist_ok=True)
    for path in files:
        fs.put_file(str(path), f"{target}/{path.relative_to(local).as_posix()}")


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
        """Store `local` (file or directory) for `job_id`; local roots move it, remote roots upload it.

        Files get the mode `open()` would give them first: safetensors writes 0600 files, the rest is 0644.
        """
        normalize_modes(local)
        if local.is_dir():
            sha, size = write_manifest(local)
        else:
            sha, size = sha256_file(local), local.stat().st_size
        target = f"{self._root_path}/{job_id}/{label}/{local.name}"
        if self.is_local:
            self._put_local(local, Path(target))
        else:
            self._put_remote(local, target)
        return StoredArtifact(kind=kind, uri=self.fs.unstrip_protocol(target), sha256=sha, size_bytes=size)

    @staticmethod
    def _put_local(local: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            shutil.move(str(local), staging)  # a rename on one filesystem; else a copy into the hidden name
            replace_local(staging, target)
        finally:
            remove_local(staging)

    def _put_remote(self, local: Path, target: str) -> None:
        if self.fs.exists(target):  # a retried stage storing again: make the old copy absent first
            if self.fs.isdir(target):
                if self.fs.exists(f"{target}/{MANIFEST}"):
                    self.fs.rm_file(f"{target}/{MANIFEST}")
                self.fs.rm(target, recursive=True)
            else:
                self.fs.rm_file(target)
        if local.is_dir():
            upload_dir(self.fs, local, target, last=MANIFEST)
        else:
            self.fs.put_file(str(local), target)

    def local_path(self, uri: str) -> Path:
        """A local path holding the artifact at `uri`: the file itself for local storage, else a cached copy."""
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            local = Path(path)
            if not local.exists():
                raise FileNotFoundError(f"artifact missing from storage: {uri}")
            if local.is_dir() and not (local / MANIFEST).is_file():
                raise IncompleteArtifactError(f"artifact incomplete in storage (no {MANIFEST}): {uri}")
            return local
        fs.invalidate_cache(path)  # another node may have stored it since this process last listed there
        if not fs.exists(path):
            raise FileNotFoundError(f"artifact missing from storage: {uri}")
        is_dir = fs.isdir(path)
        if is_dir:
            if not fs.exists(f"{path}/{MANIFEST}"):
                raise IncompleteArtifactError(f"artifact incomplete in storage (no {MANIFEST}): {uri}")
            version = hashlib.sha256(fs.cat_file(f"{path}/{MANIFEST}")).hexdigest()
        else:
            version = fs.ukey(path)
        key = hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:16]
        cached = self.local_cache / key / Path(path).name
        if cached.exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            if is_dir:
                fs.get(path, str(staging), recursive=True)
                bad = verify_manifest(staging)
                if bad:
                    raise OSError(f"artifact {uri} arrived corrupt: {', '.join(bad[:5])} do not match {MANIFEST}")
            else:
                fs.get_file(path, str(staging))
            replace_local(staging, cached)
        finally:
            remove_local(staging)
        return cached

    def open(self, uri: str, mode: str = "rb"):
        """Open a file artifact for streaming (the API's download path)."""
        return fsspec.open(uri, mode).open()
