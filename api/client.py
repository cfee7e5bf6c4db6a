"""A small client of the REST API, used by the CLI.

Given a URL it speaks HTTP; without one it mounts the app in-process (same handlers, same store), so
`sparseflow status JOB` works on the embedded defaults with no server running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from api.http_error import ApiError

__all__ = ["ApiClient", "ApiError"]


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

    def zoo_nights(self, zoo: str, limit: int = 1) -> list[dict[str, Any]]:
        return self.get(f"/v1/zoo/{quote(zoo, safe='')}/nights", limit=limit)["data"]

    def zoo_regressions(self, zoo: str, night_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/zoo/{quote(zoo, safe='')}/regressions", night_id=night_id)["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/jobs/{job_id}/artifacts")

    def download(self, artifact_id: str, output: Path, *, force: bool = False) -> Path:
        """Download an artifact into directory `output` as `output/<name>`, verified against its sha256.

        Written to a temp file first and renamed into place only once verified; an interrupted download
        is resumed (api/download.py). Raises `ApiError` (404: no such artifact, 409: the server found its
        copy corrupt), `DownloadError` (the target exists without `force`) or `ChecksumMismatch`.
        """
        from api.download import Download

        download = Download(self._http, self.get(f"/v1/artifacts/{artifact_id}"), output, force=force)
        path = download.run()
        self.resumed_from = download.resumed_from
        return path
