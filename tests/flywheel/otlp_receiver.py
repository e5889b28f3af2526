"""A real OTLP/HTTP trace receiver for tests: what Jaeger or Phoenix do with `POST /v1/traces`.

It decodes each `ExportTraceServiceRequest` (protobuf, as the services' exporter sends it) and
keeps every span as a dict: trace_id, span_id, parent_id (hex), name, service (the resource's
service.name). `GET /readyz` answers 200, so it can also stand in for Phoenix.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def decode_spans(body: bytes) -> list[dict]:
    """The spans of one OTLP/HTTP protobuf export request."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_id": span.parent_span_id.hex() or None,
                    "name": span.name,
                    "service": attributes.get("service.name", ""),
                })
    return spans


class OtlpReceiver:
    """Serves on `host`:`port` (0: a free port) in a thread, or in the foreground (`serve_forever`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 on_spans: Callable[[list[dict]], None] | None = None) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._on_spans = on_spans
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(200 if self.path == "/readyz" else 404, b"{}", "application/json")

            def do_POST(self) -> None:
                if self.path != "/v1/traces":
                    self._answer(404, b"", "text/plain")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(decode_spans(body))
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _received(self, spans: list[dict]) -> None:
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)
        if self._on_spans:
            self._on_spans(spans)

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
