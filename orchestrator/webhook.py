"""Announce a night on a Slack-compatible incoming webhook, retried with backoff, every failure recorded.

The body is what Slack's incoming webhooks take: `{"text": ...}` (the plain-text summary, also the
notification fallback) plus `blocks` (a header and the summary in sections of at most 3,000 characters).
Attempts are bounded: a transport error, HTTP 429 or a 5xx is retried after an exponentially growing
delay (`Backoff`; a 429's `Retry-After` is honoured up to the cap); any other answer is final. Each
attempt is committed to `zoo_webhook_deliveries` as it happens, so a night that dies mid-retry still shows
what was tried. Webhook URLs are credentials (Slack's carry the secret in the path), so the table keeps
only the scheme and host, and no message here shows the path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.store import zoo as zoo_store
from orchestrator.store.models import DeliveryStatus

log = logging.getLogger(__name__)

_SECTION_CHARS = 3000  # Slack's limit for a section's text
_HEADER_CHARS = 150  # and for a header's
_MAX_BLOCKS = 50


@dataclass(frozen=True)
class Backoff:
    """`attempts` tries in all; the delay before try n+1 is `first_s * factor**(n-1)`, at most `max_s`."""

    attempts: int = 5
    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_s < 0 or self.factor < 1 or self.max_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"backoff needs attempts >= 1, delays >= 0, factor >= 1, timeout > 0: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_s, self.first_s * self.factor ** (attempt - 1))


def slack_message(text: str, *, title: str) -> dict[str, Any]:
    """A Slack incoming-webhook body: `text` (plain, the fallback) and blocks showing it under `title`."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:_HEADER_CHARS] or "sparseflow"}},
    ]
    for start in range(0, len(text), _SECTION_CHARS):
        if len(blocks) == _MAX_BLOCKS:
            break
        blocks.append({"type": "section", "text": {"type": "plain_text", "text": text[start:start + _SECTION_CHARS]}})
    return {"text": text, "blocks": blocks}


def redact(url: str) -> str:
    """The URL as it may be stored and logged: scheme and host (with port) only."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/..."


def deliver(sessions: sessionmaker[Session], *, night_id: str, url: str, message: dict[str, Any],
            backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep) -> DeliveryStatus:
    """POST `message` to `url` until it is accepted (2xx) or attempts run out; return how it ended."""
    with sessions.begin() as session:
        delivery_id = zoo_store.add_delivery(session, night_id=night_id, url=redact(url)).id
    with httpx.Client(timeout=backoff.timeout_s, follow_redirects=False) as client:
        for attempt in range(1, backoff.attempts + 1):
            error, retryable, wait = _attempt(client, url, message)
            final = error is not None and (attempt == backoff.attempts or not retryable)
            with sessions.begin() as session:
                status = zoo_store.record_attempt(session, delivery_id, error=error, final=final).status
            if error is None:
                log.info("night %s announced at %s (attempt %d)", night_id, redact(url), attempt)
                return status
            log.warning("night %s: webhook %s attempt %d/%d failed: %s", night_id, redact(url), attempt,
                        backoff.attempts, error)
            if final:
                return status
            sleep(min(backoff.max_s, max(backoff.delay(attempt), wait or 0.0)))
    raise AssertionError("unreachable: the last attempt is final")


def _attempt(client: httpx.Client, url: str, message: dict[str, Any]) -> tuple[str | None, bool, float | None]:
    """(error or None, whether to retry, the server's Retry-After in seconds if it gave one)."""
    try:
        response = client.post(url, json=message)
    except httpx.HTTPError as error:  # connection refused, timeout, reset: worth another try
        return f"{type(error).__name__}: {str(error)[:300]}", True, None
    if response.is_success:
        return None, False, None
    body = response.text[:300].strip()
    error = f"HTTP {response.status_code}" + (f": {body}" if body else "")
    retryable = response.status_code == 429 or response.status_code >= 500
    return error, retryable, _retry_after(response)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None
