"""The API's error answer as an exception: its HTTP status and reason.

Kept apart from `api.client` so that code which only catches it (the CLI's commands that read the
embedded store, the downloader) does not import the HTTP client.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(RuntimeError):
    """An HTTP error answer, carrying the status and the server's reason."""

    def __init__(self, status: int, detail: Any) -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail)
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.detail = detail
