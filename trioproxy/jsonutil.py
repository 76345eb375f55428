"""JSON in and out of the proxy: every body and stream line we decode or write.

orjson (a maintained C-extension library) decodes and encodes the bodies several times
faster than the standard library, which matters twice per request and once per streamed
line. Where orjson refuses what the standard library accepts (integers beyond 64 bits,
``NaN``, non-string keys), the standard library answers instead, so the proxy accepts
every body it accepted before, and a client's malformed body gets the standard library's
error message. Output differs only in spelling that JSON leaves open (``1e-05`` is written
``1e-5``) and in ``NaN``, which orjson writes as ``null``, the valid JSON for it."""

from __future__ import annotations

import json
from typing import Any

import orjson

_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def compact_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept as is)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, non-str keys, ...
        return _COMPACT.encode(obj).encode()


def compact_json_text(obj: Any) -> str:
    return compact_json(obj).decode()


def loads(data: bytes | str) -> Any:
    """Decode JSON; raises ``ValueError`` (``json.JSONDecodeError``) on invalid input."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # integers beyond 64 bits and NaN/Infinity are valid to the standard library;
        # for truly invalid input it raises its own, familiar error
        return json.loads(data)
