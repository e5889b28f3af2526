"""The HTTP app factory: every service gets /health, /ready and /metrics from here.

`/health` answers while the process lives. `/ready` runs the service's readiness checks
(bus connected, model loaded, ...) and answers 503 with the failing ones. `/metrics` is the
Prometheus text format of the service's own registry.

Every error a service answers has one shape: FastAPI's `{"detail": ...}` (a message; for an
invalid parameter, FastAPI's list of problems) unless the service declares its own `ApiError`
subclass (inference: OpenAI's `{"error": {...}}`), in which case its routes' errors, FastAPI's
404 / 405 / validation errors and an unexpected failure's 500 all answer in that shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from libs.common.log import get_logger

log = get_logger("http")

ReadinessCheck = Callable[[], bool]


class ApiError(Exception):
    """Raised by any route or dependency: answered with `status` and `body()` as JSON.

    Its body is FastAPI's `{"detail": message}`, the shape HTTPException answers too. A service's
    own error shape (e.g. OpenAI's) subclasses it and overrides `body` and `from_http`; the app
    every service gets from `create_app` turns it into the response, so routers need no app to
    register with.
    """

    status: int = 400

    def body(self) -> dict:
        return {"detail": str(self)}

    def headers(self) -> dict[str, str]:
        return {}

    @classmethod
    def from_http(cls, status: int, message: str, param: str | None = None) -> ApiError:
        """This shape's error for one that FastAPI raised itself (unknown path, wrong method, invalid
        parameter; `param` names the parameter) or for an unexpected failure (500)."""
        error = cls(message)
        error.status = status
        return error


def inline_refs(schema: Any, definitions: dict[str, dict]) -> Any:
    """`schema` with every `$ref` (to a name in `definitions`) replaced by its definition.

    For the body of a route that reads it itself (msgspec, raw bytes): its `openapi_extra` cannot
    add components to the document, so its schema must stand alone.
    """
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inline_refs(definitions[schema["$ref"].rsplit("/", 1)[1]], definitions)
        return {key: inline_refs(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [inline_refs(value, definitions) for value in schema]
    return schema


def msgspec_schema(kind: Any) -> dict:
    """The JSON Schema of a msgspec type, standing alone (see `inline_refs`)."""
    schema = msgspec.json.schema(kind)
    return inline_refs(schema, schema.pop("$defs", {}))


class ServiceMetrics:
    """A per-service Prometheus registry with the metrics every service has."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.service = service
        self.http_requests = Counter(
            "flywheel_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.http_latency = Histogram(
            "flywheel_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry
        )
        self.events_handled = Counter(
            "flywheel_events_handled_total", "Events handled", ["subject", "outcome"], registry=self.registry
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs) -> Histogram:
        return Histogram(name, doc, list(labels), registry=self.registry, **kwargs)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, list(labels), registry=self.registry)


class RequestMetrics:
    """Counts every HTTP request by route, method and status, and times it to its last byte.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware pipes every
    response body chunk through an extra memory stream and task, which a token-by-token SSE
    stream pays on each chunk.
    """

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.http_requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.http_latency.labels(path).observe(time.perf_counter() - started)


def create_app(service: str, metrics: ServiceMetrics, checks: dict[str, ReadinessCheck],
               errors: type[ApiError] = ApiError, **fastapi_kwargs) -> FastAPI:
    """The service's app; `errors`: its error shape (default FastAPI's `{"detail": ...}`)."""
    app = FastAPI(title=f"flywheel-{service}", **fastapi_kwargs)
    app.state.metrics = metrics
    app.state.started_at = time.time()

    app.add_middleware(RequestMetrics, metrics=metrics)
    answer_errors_as(app, errors)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "service": service, "uptime_s": round(time.time() - app.state.started_at, 1)}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        results = {}
        for name, check in checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # noqa: BLE001 - a failing check means not ready
                results[name] = False
        ok = all(results.values())
        return JSONResponse({"ready": ok, "service": service, "checks": results}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def answer_errors_as(app: FastAPI, errors: type[ApiError]) -> None:
    """Every error `app` answers in the shape of `errors`: an ApiError raised by a route, an
    unexpected failure (500) and, for a shape other than FastAPI's, FastAPI's own errors (unknown
    path, wrong method, invalid parameter). Call before the app serves its first request."""

    def answer(error: ApiError, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse(error.body(), status_code=error.status, headers={**(headers or {}), **error.headers()})

    async def api_error(_request: Request, exc: ApiError) -> Response:
        return answer(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette still re-raises it, so the server logs the traceback; the client gets the
        # service's shape and no internals.
        log.error("unexpected error", path=request.url.path, error=repr(exc))
        return answer(errors.from_http(500, "internal server error (logged by the service)"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(Exception, unexpected)
    if errors is ApiError:
        return  # FastAPI's own errors are already in its shape

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return answer(errors.from_http(exc.status_code, str(exc.detail)), exc.headers)

    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        problems = exc.errors()
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems)
        param = ".".join(str(p) for p in problems[0]["loc"][1:]) if problems else ""
        return answer(errors.from_http(422, f"invalid request: {message}", param or None))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
