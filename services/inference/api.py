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
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
import structlog
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from opentelemetry import trace

from libs.common.log import get_logger
from libs.common.tracing import extract_context
from services.inference.auth import ApiKey, KeyTable
from services.inference.champion import ChampionError
from services.inference.generation import Completion, PreparedPrompt, PromptTooLong
from services.inference.metrics import InferenceMetrics
from services.inference.protocol import (
    SSE_DONE,
    ChatRequest,
    RequestError,
    chunk,
    completion_response,
    error_body,
    model_list,
    parse_chat_request,
    sse,
    usage_chunk,
)
from services.inference.serving import (
    ModelInfo,
    ModelServer,
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


class _ReloadRequest(msgspec.Struct):
    force: bool = False


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

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        try:
            chat = parse_chat_request(await request.body())
            served = served_or_503()
            try:
                prompt = await server.prepare(served, chat.messages, chat.params)
            except PromptTooLong as exc:
                raise RequestError(str(exc), param="messages", code="context_length_exceeded") from exc
        except RequestError as exc:
            metrics.requests.labels("unknown", "invalid" if exc.status < 500 else "unavailable").inc()
            raise
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        origin = _origin(request, completion_id)
        if chat.stream:
            return StreamingResponse(
                _stream_events(server, served, prompt, chat, completion_id, created, metrics, started, origin),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            completion = await server.complete(served, prompt, origin)
        except Exception as exc:
            metrics.requests.labels("false", "error").inc()
            log.error("generation failed", error=repr(exc))
            raise RequestError(f"generation failed: {exc}", status=500, type="server_error") from exc
        metrics.requests.labels("false", "ok").inc()
        metrics.latency.labels("false").observe(time.perf_counter() - started)
        return _json(completion_response(completion_id, created, served.info.id, completion))

    @routes.get("/v1/models")
    async def list_models() -> Response:
        served = served_or_503()
        return _json(model_list(served.info.id, int(served.info.loaded_at.timestamp()), "flywheel"))

    @routes.get("/models/info")
    async def model_info() -> Response:
        return _json({**msgspec.to_builtins(served_or_503().info), "last_reload_error": server.last_error})

    @routes.post("/models/reload", dependencies=[Depends(require_admin)])
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


async def _stream_events(server: ModelServer, served: ServedModel, prompt: PreparedPrompt, chat: ChatRequest,
                         completion_id: str, created: int, metrics: InferenceMetrics,
                         started: float, origin: RequestOrigin | None = None) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream: a role chunk, content chunks, a finish chunk, [usage], [DONE]."""
    model = served.info.id
    outcome = "cancelled"  # the client went away, unless we get to the end
    yield sse(chunk(completion_id, created, model, {"role": "assistant", "content": ""}))
    try:
        completion: Completion | None = None
        async with contextlib.aclosing(server.stream(served, prompt, origin)) as pieces:
            async for piece in pieces:
                if isinstance(piece, str):
                    yield sse(chunk(completion_id, created, model, {"content": piece}))
                else:
                    completion = piece
        assert completion is not None  # server.stream always ends with the Completion
        yield sse(chunk(completion_id, created, model, {}, completion.finish_reason))
        if chat.include_usage:
            yield sse(usage_chunk(completion_id, created, model, completion))
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error travels in the stream
        outcome = "error"
        log.error("generation failed mid-stream", error=repr(exc))
        yield sse(error_body(f"generation failed: {exc}", type="server_error"))
    finally:
        metrics.requests.labels("true", outcome).inc()
        metrics.latency.labels("true").observe(time.perf_counter() - started)
    yield SSE_DONE
