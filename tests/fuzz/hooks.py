"""Schemathesis hooks for tests/fuzz (loaded by `st run` through SCHEMATHESIS_HOOKS): the error-shape
check and the serializer of the gatekeeper's JSON-lines body."""

from __future__ import annotations

import msgspec
import schemathesis

# Services whose errors are OpenAI's shape; the others answer FastAPI's (libs/common/http.py).
OPENAI_SHAPED = {"inference"}


def detail_shaped(body: object) -> bool:
    """FastAPI's: `{"detail": message}`, or (an invalid parameter) `{"detail": [problems]}`."""
    if not isinstance(body, dict) or "detail" not in body:
        return False
    detail = body["detail"]
    if isinstance(detail, str):
        return bool(detail)
    return isinstance(detail, list) and bool(detail) and all(
        isinstance(p, dict) and isinstance(p.get("loc"), list) and isinstance(p.get("msg"), str) for p in detail)


def openai_shaped(body: object) -> bool:
    """OpenAI's: `{"error": {"message", "type", "param", "code"}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str)
            and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")))


@schemathesis.check
def error_shape(ctx, response, case) -> bool | None:
    """A 4xx answers in its service's error shape (a 5xx already fails `not_a_server_error`)."""
    if not 400 <= response.status_code < 500:
        return None
    service = case.operation.schema.raw_schema["info"]["title"].removeprefix("flywheel-")
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    shaped = openai_shaped if service in OPENAI_SHAPED else detail_shaped
    if not shaped(body):
        raise AssertionError(f"{service}: a {response.status_code} not in its error shape: {response.content[:300]!r}")
    return True


@schemathesis.serializer("application/x-ndjson")
def json_lines(ctx, value) -> bytes:
    """The gatekeeper's dataset body: the document's array of rows, one JSON row a line."""
    rows = value if isinstance(value, list) else [value]
    return b"".join(msgspec.json.encode(row) + b"\n" for row in rows)
