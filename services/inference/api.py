"""HTTP routes: OpenAI-compatible `/v1/*` and the service's own `/models/*`, all behind an API key.

Any key (role read or admin) may generate and read model info; `POST /models/reload` needs an
admin key (services/inference/auth.py), else 403. /health, /ready and /metrics come from
libs.common.http and stay open. The `model` a request names is not checked: this server serves
exactly one model, reported by `GET /v1/models`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from opentelemetry import trace

from libs.common.http import msgspec_schema
from libs.common.log import get_logger
from libs.common.tracing import extract_context
from services.inference.auth import ApiKey, KeyTable
from services.inference.champion import ChampionError
from services.inference.generation import Completion, Delta, EngineFailed, PreparedPrompt, PromptTooLong
from services.inference.metrics import InferenceMetrics
from services.inference.protocol import (
    SSE_DONE,
    Answer,
    ChatRequest,
    RequestError,
    TextRequest,
    TokenText,
    chat_completion_schema,
    completion_schema,
    model_list,
    parse_chat_request,
    parse_completion_request,
    sse,
)
from services.inference.serving import (
    GenerationTimeout,
    ModelInfo,
    ModelServer,
    Overloaded,
    ReloadFailed,
    RequestOrigin,
    ServedModel,
)

log = get_logger("inference.api")


class Serving(Protocol):
    """What the routes need: the model server, the keys, the metrics and the reload command."""

    server: ModelServer
    keys: KeyTable
    metrics: InferenceMetrics

    async def reload(self, force: bool) -> ModelInfo: ...


@dataclass(frozen=True)
class Kind:
    """Chat or text completions: how a request is read and prompted, and how its answer is shaped."""

    chat: bool
    parse: Callable[[bytes], ChatRequest | TextRequest]
    prepare: Callable[[ModelServer, ServedModel, Any], PreparedPrompt]
    prompt_param: str
    id_prefix: str


CHAT = Kind(True, parse_chat_request, lambda server, served, r: server.prepare(served, r.messages, r.params),
            "messages", "chatcmpl")
TEXT = Kind(False, parse_completion_request, lambda server, served, r: server.prepare_text(served, r.prompt, r.params),
            "prompt", "cmpl")


class _ReloadRequest(msgspec.Struct):
    force: bool = False


def _json_body(schema: dict, required: bool = True) -> dict:
    """`openapi_extra` declaring the JSON body a route reads itself (msgspec, not FastAPI's models)."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


# A completion answers JSON, or with `"stream": true` Server-Sent Events.
_COMPLETION_RESPONSES = {200: {"content": {"text/event-stream": {}}}}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json")


def router(serving: Serving) -> APIRouter:
    """Every route behind an API key (RequestError answers via libs.common.http.ApiError)."""
    server, keys, metrics = serving.server, serving.keys, serving.metrics

    async def caller(authorization: str | None = Header(default=None)) -> ApiKey:
        key = keys.match(authorization)
        if key is None:
            raise RequestError("missing or invalid API key: send 'Authorization: Bearer <key>'",
                               status=401, code="invalid_api_key")
        # Who called, by the key's name (never the key), on every log line of this request.
        structlog.contextvars.bind_contextvars(caller=key.name)
        return key

    # A default, not Annotated: `caller` is local, and FastAPI resolves string annotations in module globals.
    async def require_admin(key: ApiKey = Depends(caller)) -> None:  # noqa: B008
        if key.role != "admin":
            log.info("refused: the key's role may not reload", role=key.role)
            raise RequestError(f"this key's role ({key.role}) may not reload; an admin key is required",
                               status=403, code="insufficient_permissions")

    routes = APIRouter(dependencies=[Depends(caller)])

    def served_or_503() -> ServedModel:
        served = server.current
        if served is None:
            reason = f": {server.last_error}" if server.last_error else " yet"
            raise RequestError(f"no model is loaded{reason}", status=503, type="server_error", code="model_not_loaded")
        return served

    async def respond(request: Request, kind: Kind) -> Response:
        started = time.perf_counter()
        try:
            wanted = kind.parse(await request.body())
            served = served_or_503()
            try:
                prompt = kind.prepare(server, served, wanted)
            except PromptTooLong as exc:
                raise RequestError(str(exc), param=kind.prompt_param, code="context_length_exceeded") from exc
            if not prompt.input_ids:
                # An empty text prompt (the tokenizer adds no BOS) leaves the engine nothing to continue.
                raise RequestError("the prompt is empty: there is no token to continue from", param=kind.prompt_param)
        except RequestError as exc:
            metrics.requests.labels("unknown", "invalid" if exc.status < 500 else "unavailable").inc()
            raise
        completion_id, created = f"{kind.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        origin = _origin(request, completion_id)
        answer = Answer(kind.chat, completion_id, created, served.info.id, TokenText(served.backend.tokenizer))
        generation = server.generate(served, prompt, origin, stream=wanted.stream)
        try:
            # The first item: admission (429) and the engine's first failures come back as errors, not as a broken stream.
            first = await anext(generation)
        except StopAsyncIteration:
            first = None
        except (Overloaded, GenerationTimeout, EngineFailed) as exc:
            await generation.aclose()
            metrics.requests.labels(str(wanted.stream).lower(), _outcome(exc)).inc()
            raise _request_error(exc) from exc
        if wanted.stream:
            return StreamingResponse(
                _stream_events(generation, first, answer, wanted.include_usage, metrics, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completions: list[Completion] = []
        try:
            async with contextlib.aclosing(generation):
                item = first
                while item is not None:
                    if isinstance(item[1], Completion):
                        completions.append(item[1])
                    item = await anext(generation, None)
        except (GenerationTimeout, EngineFailed) as exc:
            metrics.requests.labels("false", _outcome(exc)).inc()
            log.error("generation failed", error=repr(exc))
            raise _request_error(exc) from exc
        metrics.requests.labels("false", "ok").inc()
        metrics.latency.labels("false").observe(time.perf_counter() - started)
        return _json(answer.whole(completions))

    @routes.post("/v1/chat/completions", openapi_extra=_json_body(chat_completion_schema()),
                  responses=_COMPLETION_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await respond(request, CHAT)

    @routes.post("/v1/completions", openapi_extra=_json_body(completion_schema()),
                  responses=_COMPLETION_RESPONSES)
    async def completions(request: Request) -> Response:
        return await respond(request, TEXT)

    @routes.get("/v1/models")
    async def list_models() -> Response:
        served = served_or_503()
        return _json(model_list(served.info.id, int(served.info.loaded_at.timestamp()), "flywheel"))

    @routes.get("/models/info")
    async def model_info() -> Response:
        return _json({**msgspec.to_builtins(served_or_503().info), "last_reload_error": server.last_error})

    @routes.post("/models/reload", dependencies=[Depends(require_admin)],
                 openapi_extra=_json_body(msgspec_schema(_ReloadRequest), required=False))
    async def reload_model(request: Request) -> Response:
        body = await request.body()
        try:
            wanted = msgspec.json.decode(body, type=_ReloadRequest) if body.strip() else _ReloadRequest()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RequestError(f"invalid request: {exc}", param="force") from exc
        log.info("reload requested", force=wanted.force)
        try:
            info = await serving.reload(wanted.force)
        except (ReloadFailed, ChampionError) as exc:
            raise RequestError(f"reload failed, the previous model is still served: {exc}",
                               status=500, type="server_error", code="reload_failed") from exc
        return _json(msgspec.to_builtins(info))

    return routes


def _origin(request: Request, completion_id: str) -> RequestOrigin:
    """The request's completion id and the span its `traceparent` header names (its own trace), if any."""
    span = trace.get_current_span(extract_context(dict(request.headers))).get_span_context()
    return RequestOrigin(completion_id, span if span.is_valid else None)


def _outcome(exc: Exception) -> str:
    return {Overloaded: "refused", GenerationTimeout: "timeout"}.get(type(exc), "error")


def _request_error(exc: Exception) -> RequestError:
    if isinstance(exc, Overloaded):
        return RequestError(str(exc), status=429, type="server_overloaded", code="too_many_requests_in_flight",
                            retry_after_s=1)
    if isinstance(exc, GenerationTimeout):
        return RequestError(str(exc), status=504, type="timeout", code="request_timeout")
    return RequestError(f"generation failed: {exc}", status=503, type="server_error", code="engine_failed")


async def _stream_events(generation: AsyncIterator[tuple[int, Delta | Completion]], first: tuple | None, answer: Answer,
                         include_usage: bool, metrics: InferenceMetrics, started: float) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream: per choice a role chunk (chat), content chunks and a finish chunk; [usage]; [DONE]."""
    outcome = "cancelled"  # the client went away, unless we get to the end
    completions: list[Completion] = []
    opened: set[int] = set()
    try:
        async with contextlib.aclosing(generation):
            item = first
            while item is not None:
                index, piece = item
                if index not in opened and answer.chat:
                    opened.add(index)
                    yield sse(answer.opening(index))
                if isinstance(piece, Completion):
                    completions.append(piece)
                    yield sse(answer.finish(piece))
                else:
                    yield sse(answer.delta(index, piece))
                item = await anext(generation, None)
        if include_usage:
            yield sse(answer.usage(completions))
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error travels in the stream
        outcome = _outcome(exc)
        log.error("generation failed mid-stream", error=repr(exc))
        yield sse(_request_error(exc).body())
    finally:
        metrics.requests.labels("true", outcome).inc()
        metrics.latency.labels("true").observe(time.perf_counter() - started)
    yield SSE_DONE
