"""A small client of the REST API, used by the CLI.

Given a URL it speaks HTTP; without one it mounts the app in-process (same handlers, same store), so
`sparseflow status JOB` works on the embedded defaults with no server running.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """An HTTP error answer, carrying the status and the server's reason."""

    def __init__(self, status: int, detail: Any) -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail)
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.detail = detail


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, settings: Any = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self._http: httpx.Client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)
        else:
            from fastapi.testclient import TestClient

            from api.app import create_app

            self._http = TestClient(create_app(settings), headers=headers)
            self._http.__enter__()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if hasattr(self._http, "__exit__"):
            self._http.__exit__(None, None, None)
        self._http.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._check(self._http.get(path, params=params))

    def post(self, path: str, body: Any = None) -> Any:
        return self._check(self._http.post(path, json=body))

    def submit(self, recipe: dict[str, Any], start: bool = True) -> dict[str, Any]:
        return self.post("/v1/jobs", {"recipe": recipe, "start": start})

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.get("/v1/jobs", limit=limit)["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/jobs/{job_id}/artifacts")

    def download(self, artifact_id: str, output: Path) -> Path:
        """Stream an artifact into `output` and verify it against the sha256 the server announced."""
        output.mkdir(parents=True, exist_ok=True)
        with self._http.stream("GET", f"/v1/artifacts/{artifact_id}/download") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            expected = response.headers.get("X-Sparseflow-Sha256", "")
            name = response.headers["Content-Disposition"].split('filename="')[1].rstrip('"')
            target = output / name
            digest = hashlib.sha256()
            with target.open("wb") as handle:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    handle.write(chunk)
            is_tar = response.headers.get("X-Sparseflow-Format") == "tar"
        if not is_tar:
            if expected and digest.hexdigest() != expected:
                raise ApiError(502, f"sha256 mismatch for {target}: got {digest.hexdigest()}, expected {expected}")
            return target
        return _unpack_verified(target, output, expected)


def _unpack_verified(archive: Path, output: Path, expected: str) -> Path:
    """Unpack a directory artifact and check its manifest digest and every file's checksum."""
    from workers.storage import MANIFEST, verify_manifest

    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(output, filter="data")
    archive.unlink()
    directory = output / top
    manifest = (directory / MANIFEST).read_bytes()
    if expected and hashlib.sha256(manifest).hexdigest() != expected:
        raise ApiError(502, f"manifest sha256 mismatch for {directory}")
    bad = verify_manifest(directory)
    if bad:
        raise ApiError(502, f"checksum mismatch in {directory}: {', '.join(bad)}")
    return directory
