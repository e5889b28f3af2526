"""The HTTP app factory: every service gets /health, /ready and /metrics from here.

`/health` answers while the process lives. `/ready` runs the service's readiness checks
(bus connected, model loaded, ...) and answers 503 with the failing ones. `/metrics` is the
Prometheus text format of the service's own registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ReadinessCheck = Callable[[], bool]


class ApiError(Exception):
    """Raised by any route or dependency: answered with `status` and `body()` as JSON.

    A service's own error shape (e.g. OpenAI's) subclasses it; the app every service gets
    from `create_app` turns it into the response, so routers need no app to register with.
    """

    status: int = 400

    def body(self) -> dict:
        return {"error": str(self)}

    def headers(self) -> dict[str, str]:
        return {}


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


def create_app(service: str, metrics: ServiceMetrics, checks: dict[str, ReadinessCheck], **fastapi_kwargs) -> FastAPI:
    app = FastAPI(title=f"flywheel-{service}", **fastapi_kwargs)
    app.state.metrics = metrics
    app.state.started_at = time.time()

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

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

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
