"""Downloading an artifact safely: into a temp file, verified, then renamed into place; resumable.

The bytes go to `<dir>/.<name>.<sha256 prefix>.part`. An interrupted download leaves that part behind and
the next attempt resumes it with `Range` + `If-Range` (the ETag is the sha256, so a part of other bytes is
never continued: the server then answers 200 and the part is rewritten from the start). A file is checked
against its sha256; a directory's tar is unpacked into a temp directory beside the target and checked
against its `checksums.json` manifest (every file, no extra ones) and the manifest against the sha256.
Only then is it renamed into place. A mismatch removes everything written and raises `ChecksumMismatch`;
any other failure removes what was written too, except a part file that a later attempt can resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that could not be completed; nothing of it was left in place."""


class ChecksumMismatch(DownloadError):
    """The received bytes do not match the sha256 the server recorded for them."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sha256_of(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest


class Download:
    """One artifact into directory `output` as `output/<name>`; `run()` returns the final path."""

    def __init__(self, http: Any, artifact: dict[str, Any], output: Path, *, force: bool = False) -> None:
        self.http = http
        self.artifact = artifact
        self.output = output
        self.force = force
        self.name = str(artifact["name"])
        self.sha256 = artifact.get("sha256") or ""
        self.target = output / self.name
        self.part = output / f".{self.name}.{self.sha256[:16] or 'nosha'}.part"
        self.resumed_from = 0

    def run(self) -> Path:
        if not self.artifact.get("download_url"):
            raise DownloadError(f"artifact {self.artifact.get('id')} is an input reference; it has no download")
        if self.output.exists() and not self.output.is_dir():
            raise DownloadError(f"{self.output} exists and is not a directory")
        if (self.target.exists() or self.target.is_symlink()) and not self.force:
            raise DownloadError(f"{self.target} already exists (use --force to replace it)")
        created = not self.output.exists()
        self.output.mkdir(parents=True, exist_ok=True)
        try:
            is_tar = self._fetch()
            return self._install_tar() if is_tar else self._install_file()
        except BaseException:
            if created and not any(self.output.iterdir()):
                self.output.rmdir()
            raise

    def _fetch(self) -> bool:
        """Bring the body into the part file (resuming it if one exists); True if it is a tar."""
        offset = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"Range": f"bytes={offset}-", "If-Range": f'"{self.sha256}"'} if offset and self.sha256 else {}
        with self.http.stream("GET", self.artifact["download_url"], headers=headers) as response:
            if response.status_code == 416:  # the part is not a prefix of these bytes: start over
                response.read()
                _remove(self.part)
                return self._fetch()
            if response.status_code >= 400:
                response.read()
                _remove(self.part)
                raise _api_error(response)
            resumed = response.status_code == 206
            self.resumed_from = offset if resumed else 0
            with self.part.open("ab" if resumed else "wb") as handle:
                for chunk in response.iter_bytes(_CHUNK):
                    handle.write(chunk)
            announced = response.headers.get("X-Sparseflow-Sha256", "")
            if announced and self.sha256 and announced != self.sha256:
                _remove(self.part)
                raise ChecksumMismatch(f"{self.name}: the server now announces sha256 {announced}, "
                                       f"the artifact record says {self.sha256}")
            return response.headers.get("X-Sparseflow-Format") == "tar"

    def _install_file(self) -> Path:
        actual = _sha256_of(self.part).hexdigest()
        if self.sha256 and actual != self.sha256:
            _remove(self.part)
            raise ChecksumMismatch(f"{self.name}: sha256 of the received bytes is {actual}, expected "
                                   f"{self.sha256}; nothing was kept")
        if self.force:
            _remove(self.target)
        os.replace(self.part, self.target)
        return self.target

    def _install_tar(self) -> Path:
        from workers.storage import MANIFEST

        staging = self.output / f".{self.name}.{self.sha256[:16] or 'nosha'}.unpack"
        _remove(staging)
        try:
            with tarfile.open(self.part) as tar:
                tops = {member.name.split("/")[0] for member in tar.getmembers()}
                if tops != {self.name}:
                    raise DownloadError(f"{self.name}: the archive holds {sorted(tops)[:3]}, not {self.name}/")
                tar.extractall(staging, filter="data")
            unpacked = staging / self.name
            problem = _check_manifest(unpacked, MANIFEST, self.sha256)
            if problem:
                raise ChecksumMismatch(f"{self.name}: {problem}; nothing was kept")
            if self.force:
                _remove(self.target)
            os.replace(unpacked, self.target)
        except (tarfile.TarError, DownloadError):
            _remove(self.part)
            raise
        finally:
            _remove(staging)
        _remove(self.part)
        return self.target


def _check_manifest(directory: Path, manifest: str, sha256: str) -> str | None:
    """None if `directory` matches its manifest exactly and the manifest matches `sha256`, else why not."""
    raw_path = directory / manifest
    if not raw_path.is_file():
        return f"{manifest} is missing"
    raw = raw_path.read_bytes()
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        return f"{manifest} does not match sha256 {sha256}"
    expected: dict[str, str] = json.loads(raw)["files"]
    present = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    present.pop(manifest, None)
    bad = sorted(n for n, d in expected.items() if n not in present or _sha256_of(present[n]).hexdigest() != d)
    extra = sorted(set(present) - set(expected))
    if bad or extra:
        return "checksum mismatch in " + ", ".join((bad + extra)[:5])
    return None


def _api_error(response: httpx.Response) -> Exception:
    from api.http_error import ApiError

    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return ApiError(response.status_code, detail)
