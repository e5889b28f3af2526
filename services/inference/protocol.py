"""The OpenAI chat-completions wire format: which requests are valid, and the response shapes.

Unknown request fields are ignored (clients send many optional ones), but a field that is
present must be valid, and options this server cannot honour (n > 1, non-text content) are
refused with a 400 rather than silently ignored. Errors use OpenAI's body:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from libs.common.chat import ChatMessage
from libs.common.http import ApiError
from services.inference.generation import Completion, GenerationParams

MAX_STOP_SEQUENCES = 4
# OpenAI's "developer" role is the newer name for "system".
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_PARAM_AT = re.compile(r"at `\$\.?([^`]*)`")


class RequestError(ApiError, ValueError):
    """A request the API refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------- requests


class _ContentPart(msgspec.Struct):
    type: str
    text: str = ""


class _Message(msgspec.Struct):
    role: str
    content: str | list[_ContentPart] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _ChatCompletionRequest(msgspec.Struct, kw_only=True):
    messages: Annotated[list[_Message], Meta(min_length=1)]
    model: str = ""
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A valid request, in this server's terms."""

    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        raw = msgspec.json.decode(body, type=_ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        found = _PARAM_AT.search(str(exc))
        raise RequestError(f"invalid request: {exc}", param=found.group(1) if found else None) from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if raw.n not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    return ChatRequest(
        model=raw.model,
        messages=[_message(i, m) for i, m in enumerate(raw.messages)],
        params=GenerationParams(
            max_tokens=raw.max_completion_tokens or raw.max_tokens,
            temperature=1.0 if raw.temperature is None else raw.temperature,
            top_p=1.0 if raw.top_p is None else raw.top_p,
            stop=_stops(raw.stop),
            seed=raw.seed,
        ),
        stream=bool(raw.stream),
        include_usage=bool(raw.stream_options and raw.stream_options.include_usage),
    )


def _message(index: int, message: _Message) -> ChatMessage:
    role = _ROLE_ALIASES.get(message.role)
    if role is None:
        raise RequestError(f"role {message.role!r} is not supported; use system, user or assistant",
                           param=f"messages[{index}].role")
    content = message.content
    if content is None:
        raise RequestError("message content is required", param=f"messages[{index}].content")
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise RequestError("only text content parts are supported", param=f"messages[{index}].content")
        content = "".join(part.text for part in content)
    return ChatMessage(role=role, content=content)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise RequestError("stop sequences must not be empty", param="stop")
    return tuple(stops)


# ---------------------------------------------------------------------------- responses


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def completion_response(completion_id: str, created: int, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason,
        }],
        "usage": usage(completion),
    }


def chunk(completion_id: str, created: int, model: str, delta: dict[str, str],
          finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage_chunk(completion_id: str, created: int, model: str, completion: Completion) -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(completion),
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_list(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": owned_by}]}
