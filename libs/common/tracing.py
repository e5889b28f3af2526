"""OpenTelemetry: one span per handled event, linked across services through NATS headers.

Spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (any collector,
Jaeger, Phoenix) and always appended as JSON lines to `<data_dir>/traces/<service>.jsonl`,
which `flywheel trace <trace_id>` reads to show a dataset's journey without a collector.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

_provider: TracerProvider | None = None


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans to a JSON-lines file, one object per span."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(json.dumps({
                "trace_id": f"{ctx.trace_id:032x}",
                "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "name": span.name,
                "service": span.resource.attributes.get("service.name", ""),
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "status": span.status.status_code.name,
                "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
            }))
        with self._lock, self._path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:  # nothing buffered here
        pass


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def setup_tracing(service: str, data_dir: Path | None) -> TracerProvider:
    """Install the global tracer provider for `service` (idempotent per process)."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create({
        "service.name": f"flywheel-{service}",
        # Phoenix groups spans into projects by this attribute, not by service.name.
        "openinference.project.name": "flywheel",
    })
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if data_dir is not None:
        exporter = JsonlSpanExporter(Path(data_dir) / "traces" / f"{service}.jsonl")
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()


def tracer(name: str = "flywheel") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the current span's W3C `traceparent` into `headers` (a plain dict, as nats-py uses)."""
    propagate.inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None):
    return propagate.extract(headers or {})


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def trace_id_from_headers(headers: dict[str, str] | None) -> str:
    """The trace id in a `traceparent` header (version-traceid-spanid-flags)."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else ""


def read_trace(data_dir: Path, trace_id: str) -> list[dict]:
    """Every span of `trace_id` recorded under `data_dir/traces`, oldest first."""
    spans = []
    for path in sorted((Path(data_dir) / "traces").glob("*.jsonl")):
        with path.open() as fh:
            for line in fh:
                if trace_id in line:
                    span = json.loads(line)
                    if span["trace_id"] == trace_id:
                        spans.append(span)
    return sorted(spans, key=lambda s: s["start_ns"])


def span_rows(spans: list[dict]) -> list[tuple[int, dict, int]]:
    """Spans depth-first under their parents as (depth, span, repeats).

    Runs of childless siblings with the same name (training.progress every few seconds)
    fold into one row whose span stretches from the first start to the last end.
    """
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict]] = {}
    for span in spans:
        children.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(span)
    rows: list[tuple[int, dict, int]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            last = rows[-1] if rows else None
            if (last and last[0] == depth and last[1]["name"] == span["name"] and span["span_id"] not in children
                    and last[1]["span_id"] not in children and last[1]["parent_id"] == span["parent_id"]):
                folded = {**last[1], "end_ns": max(last[1]["end_ns"] or 0, span["end_ns"] or 0)}
                rows[-1] = (depth, folded, last[2] + 1)
                continue
            rows.append((depth, span, 1))
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return rows


def format_trace(spans: list[dict]) -> str:
    """An indented tree of spans with start offsets and durations: the tracing view for a terminal."""
    if not spans:
        return "(no spans recorded)"
    origin = min(s["start_ns"] for s in spans)
    out = []
    for depth, span, repeats in span_rows(spans):
        start = (span["start_ns"] - origin) / 1e9
        took = ((span["end_ns"] or span["start_ns"]) - span["start_ns"]) / 1e9
        name = span["name"] + (f" ×{repeats}" if repeats > 1 else "")
        out.append(f"{'  ' * depth}{name:<{48 - 2 * depth}} {span['service']:<22} +{start:7.2f}s {took:7.2f}s")
    return "\n".join(out)
