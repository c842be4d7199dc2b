"""JSON as both SQL backends store it. Pure."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

__all__ = ["bytes_as_json", "dumps_json"]


def bytes_as_json(value: Any) -> Any:
    """`default=` for JSON encoders: byte strings as {"$base64": ...}, nothing else."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(value).decode()}
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps_json(value: Any) -> str:
    """JSON both backends store: byte strings as {"$base64": ...}, non-finite floats as null
    (PostgreSQL refuses NaN); NUL characters stay, escaped as \\u0000, which `json` columns
    keep. The common case is one pass in C."""
    options: dict[str, Any] = {
        "default": bytes_as_json,
        "ensure_ascii": False,
        "separators": (",", ":"),
    }
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False, **options)
