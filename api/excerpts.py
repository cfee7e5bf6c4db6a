"""Short excerpts of client input for error bodies.

Validation errors carry the offending value (`input`) and the constraint's parameters (`ctx`). Echoed
as they are, a 50 MB name comes back as a 50 MB error, and a NaN cannot be written as JSON at all
(the default handler then fails with a 500). Here every echoed value is cut to a short, JSON-safe
excerpt, while `loc` (the field path) and `msg` (the reason) stay readable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

EXCERPT_CHARS = 200
MESSAGE_CHARS = 1000


def cut(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> Any:
    """A JSON-safe value no longer than about `limit` characters when written out.

    Short scalars, lists and mappings come back as they were; anything longer comes back as the start
    of its JSON text. Non-finite floats come back as their names ("nan", "inf"), which JSON can carry.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value, limit)
    if isinstance(value, bytes):
        return cut(value.decode("utf-8", "replace"), limit)
    safe = _json_safe(value)
    written = json.dumps(safe, ensure_ascii=False, default=str)
    return safe if len(written) <= limit else cut(written, limit)


def _json_safe(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return "..."
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, bytes):
        return [_json_safe(v, depth + 1) for v in value]
    return str(value)


def short_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error dicts with their echoed values cut to excerpts.

    Keeps `type`, `loc` (each part a str or int, long keys cut), `msg`, and `input`/`ctx` as
    excerpts, so the body stays a valid `HTTPValidationError` of the OpenAPI schema.
    """
    out = []
    for error in errors:
        item: dict[str, Any] = {
            "type": str(error.get("type", "value_error")),
            "loc": [p if isinstance(p, int) else cut(str(p)) for p in error.get("loc", ())],
            "msg": cut(str(error.get("msg", "")), MESSAGE_CHARS),
        }
        if "input" in error:
            item["input"] = excerpt(error["input"])
        if error.get("ctx"):
            item["ctx"] = {
                str(k): excerpt(v if v is None or isinstance(v, bool | int | float | str) else str(v))
                for k, v in error["ctx"].items()
            }
        out.append(item)
    return out
