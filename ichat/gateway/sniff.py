"""Reading what routing needs from a request body, without touching the bytes that go upstream.

A JSON body is parsed once (orjson) for ``model`` and ``stream``; a ``multipart/form-data``
body (audio uploads) is walked for its ``model`` and ``stream`` form fields without copying
the uploaded file. Every failure is an :class:`~ichat.errors.InvalidRequest` (400).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ichat.errors import InvalidRequest


def read_model(body: bytes, headers: Mapping[str, str]) -> tuple[str, bool, dict[str, Any] | None]:
    """Return (model, stream, the parsed JSON object or None for a multipart form)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        content_type = headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            model, stream = _model_from_form(body, content_type)
            return model, stream, None
        raise InvalidRequest("Request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Request body must name a model: a non-empty string 'model' field.", param="model")
    return model, obj.get("stream") is True, obj


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)


def _model_from_form(body: bytes, content_type: str) -> tuple[str, bool]:
    match = _BOUNDARY.search(content_type)
    fields = form_fields(body, match.group(1).encode(), (b"model", b"stream")) if match else {}
    model = fields.get(b"model")
    if not model:
        raise InvalidRequest("Multipart request must carry a non-empty 'model' form field.", param="model")
    return model.decode("utf-8", "replace"), fields.get(b"stream", b"").lower() == b"true"


def form_fields(body: bytes, boundary: bytes, names: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """Values of the named non-file fields of a multipart/form-data body.

    Walks the boundaries with ``find`` and slices only the small parts it wants, so a large
    uploaded file is never copied.
    """
    found: dict[bytes, bytes] = {}
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos != -1 and len(found) < len(names):
        start = pos + len(delimiter)
        if body.startswith(b"--", start):
            break  # closing delimiter
        end = body.find(b"\r\n" + delimiter, start)
        head_end = body.find(b"\r\n\r\n", start, len(body) if end == -1 else end)
        if head_end != -1:
            head = body[start:head_end]
            for line in head.split(b"\r\n"):
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-disposition" and b"filename" not in value.lower():
                    name = _FIELD_NAME.search(value)
                    if name and name.group(1) in names:
                        found[name.group(1)] = body[head_end + 4 : len(body) if end == -1 else end]
        pos = -1 if end == -1 else end + 2
    return found
