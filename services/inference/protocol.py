"""The OpenAI wire format (chat completions and legacy completions): valid requests, response shapes.

Unknown request fields are ignored (clients send many optional ones), but a field that is
present must be valid, and options this server cannot honour (non-text content, `echo`, several
prompts in one request) are refused with a 400 rather than silently ignored. Errors use
OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.

Log probabilities come in the two shapes the two APIs use: chat's `logprobs.content` (one entry
per token with its `top_logprobs`), completions' `logprobs` (`tokens`, `token_logprobs`,
`top_logprobs` as token -> logprob maps, `text_offset`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from libs.common.chat import ChatMessage
from libs.common.http import ApiError, msgspec_schema
from services.inference.generation import Completion, Delta, GenerationParams
from services.inference.sampling import TokenLogprob

MAX_STOP_SEQUENCES = 4
# OpenAI's limits: n up to 128, top_logprobs up to 20 (chat) and logprobs up to 5 (completions).
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# The completions API's default when max_tokens is not sent.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# OpenAI's "developer" role is the newer name for "system".
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_PARAM_AT = re.compile(r"at `\$\.?([^`]*)`")


class RequestError(ApiError, ValueError):
    """A request the API refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    @classmethod
    def from_http(cls, status: int, message: str, param: str | None = None) -> RequestError:
        # OpenAI answers an invalid request 400, where FastAPI's own validation says 422.
        status = 400 if status == 422 else status
        return cls(message, param=param, status=status, type="invalid_request_error" if status < 500 else "server_error")

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        # The official clients wait this long before their retry of a 429 or 503.
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


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
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class _CompletionRequest(msgspec.Struct, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1)]
    model: str = ""
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    seed: int | None = None
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: int | None = None


def chat_completion_schema() -> dict[str, Any]:
    """The chat body's JSON Schema, for the API's document: the struct's, with what `_message` checks
    after decoding (so that its errors can say what is allowed): the roles, text parts, content required."""
    schema = msgspec_schema(_ChatCompletionRequest)
    text_part = {"type": "object", "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                 "required": ["type"]}
    message = schema["properties"]["messages"]["items"]
    message["properties"]["role"] = {"enum": list(_ROLE_ALIASES)}
    message["properties"]["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    message["required"] = ["role", "content"]
    return schema


def completion_schema() -> dict[str, Any]:
    """The completions body's JSON Schema, for the API's document: one prompt, a text or a list of one."""
    schema = msgspec_schema(_CompletionRequest)
    schema["properties"]["prompt"] = {"anyOf": [{"type": "string"},
                                                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]}
    return schema


@dataclass(frozen=True)
class ChatRequest:
    """A valid chat request, in this server's terms."""

    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class TextRequest:
    """A valid (legacy) completions request, in this server's terms."""

    model: str
    prompt: str
    params: GenerationParams
    stream: bool
    include_usage: bool


def _decode(body: bytes, kind: type):
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        found = _PARAM_AT.search(str(exc))
        raise RequestError(f"invalid request: {exc}", param=found.group(1) if found else None) from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc


def parse_chat_request(body: bytes) -> ChatRequest:
    raw = _decode(body, _ChatCompletionRequest)
    if raw.top_logprobs is not None and not raw.logprobs:
        raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    return ChatRequest(
        model=raw.model,
        messages=[_message(i, m) for i, m in enumerate(raw.messages)],
        params=GenerationParams(
            max_tokens=raw.max_completion_tokens or raw.max_tokens,
            temperature=1.0 if raw.temperature is None else raw.temperature,
            top_p=1.0 if raw.top_p is None else raw.top_p,
            stop=_stops(raw.stop),
            seed=raw.seed,
            n=raw.n or 1,
            top_logprobs=(raw.top_logprobs or 0) if raw.logprobs else None,
        ),
        stream=bool(raw.stream),
        include_usage=bool(raw.stream_options and raw.stream_options.include_usage),
    )


def parse_completion_request(body: bytes) -> TextRequest:
    raw = _decode(body, _CompletionRequest)
    if raw.echo:
        raise RequestError("echo is not supported", param="echo")
    if raw.best_of not in (None, 1) and raw.best_of != raw.n:
        raise RequestError("best_of is not supported (other than equal to n)", param="best_of")
    prompts = [raw.prompt] if isinstance(raw.prompt, str) else raw.prompt
    if len(prompts) != 1:
        raise RequestError("send one prompt per request (a list of one is fine)", param="prompt")
    return TextRequest(
        model=raw.model,
        prompt=prompts[0],
        params=GenerationParams(
            max_tokens=raw.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
            temperature=1.0 if raw.temperature is None else raw.temperature,
            top_p=1.0 if raw.top_p is None else raw.top_p,
            stop=_stops(raw.stop),
            seed=raw.seed,
            n=raw.n or 1,
            top_logprobs=raw.logprobs,
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


def usage(completions: list[Completion]) -> dict[str, int]:
    prompt = completions[0].prompt_tokens if completions else 0
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class TokenText:
    """Token ids -> the text of each token alone (for log probabilities), memoised."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._known.get(token)
        if text is None:
            text = self._known[token] = self.tokenizer.decode([token])
        return text


def chat_logprobs(entries: list[TokenLogprob] | None, text: TokenText) -> dict[str, Any] | None:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}, ...]}`."""
    if entries is None:
        return None

    def one(token: int, logprob: float) -> dict[str, Any]:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, text: TokenText, offset: int = 0) -> dict[str, Any] | None:
    """Completions' `logprobs` object; `offset`: where the first token's text starts in the choice."""
    if entries is None:
        return None
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(text(entry.token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def completion_response(completion_id: str, created: int, model: str, completions: list[Completion],
                        text: TokenText | None = None) -> dict[str, Any]:
    """A chat completion with every choice."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(c.logprobs, text) if text else None,
            "finish_reason": c.finish_reason,
        } for c in sorted(completions, key=lambda c: c.index)],
        "usage": usage(completions),
    }


def text_completion_response(completion_id: str, created: int, model: str, completions: list[Completion],
                             text: TokenText | None = None) -> dict[str, Any]:
    """A (legacy) text completion with every choice."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": c.index,
            "text": c.text,
            "logprobs": text_logprobs(c.logprobs, text) if text else None,
            "finish_reason": c.finish_reason,
        } for c in sorted(completions, key=lambda c: c.index)],
        "usage": usage(completions),
    }


def chunk(completion_id: str, created: int, model: str, delta: dict[str, str],
          finish_reason: str | None = None, index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat stream chunk for one choice."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def text_chunk(completion_id: str, created: int, model: str, text: str, finish_reason: str | None = None,
               index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completions stream chunk for one choice."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(completion_id: str, created: int, model: str, completions: list[Completion],
                object: str = "chat.completion.chunk") -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": completion_id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(completions),
    }


class Answer:
    """The response objects of one request, chat or text completion, streamed or whole."""

    def __init__(self, chat: bool, completion_id: str, created: int, model: str, text: TokenText) -> None:
        self.chat, self.id, self.created, self.model, self.text = chat, completion_id, created, model, text
        # Completions' text_offset runs on through a choice's stream.
        self._offsets: dict[int, int] = {}

    def opening(self, index: int) -> dict[str, Any]:
        """Chat streams open each choice with the assistant role."""
        return chunk(self.id, self.created, self.model, {"role": "assistant", "content": ""}, index=index)

    def delta(self, index: int, delta: Delta) -> dict[str, Any]:
        if self.chat:
            return chunk(self.id, self.created, self.model, {"content": delta.text}, index=index,
                         logprobs=chat_logprobs(delta.logprobs, self.text))
        offset = self._offsets.get(index, 0)
        logprobs = text_logprobs(delta.logprobs, self.text, offset)
        if logprobs:
            self._offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        return text_chunk(self.id, self.created, self.model, delta.text, index=index, logprobs=logprobs)

    def finish(self, completion: Completion) -> dict[str, Any]:
        if self.chat:
            return chunk(self.id, self.created, self.model, {}, completion.finish_reason, index=completion.index)
        return text_chunk(self.id, self.created, self.model, "", completion.finish_reason, index=completion.index)

    def usage(self, completions: list[Completion]) -> dict[str, Any]:
        return usage_chunk(self.id, self.created, self.model, completions,
                           object="chat.completion.chunk" if self.chat else "text_completion")

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        build = completion_response if self.chat else text_completion_response
        return build(self.id, self.created, self.model, completions, self.text)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_list(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": owned_by}]}
