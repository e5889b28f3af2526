from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from libs.common.tracing import JsonlSpanExporter, format_trace, read_trace, span_rows, trace_id_from_headers


def _record(tmp_path: Path) -> str:
    provider = TracerProvider(resource=Resource.create({"service.name": "flywheel-test"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(tmp_path / "traces" / "test.jsonl")))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        for _ in range(3):
            with tracer.start_as_current_span("training.progress publish"):
                pass
        with tracer.start_as_current_span("checkpoint.saved publish") as child:
            child.set_attribute("flywheel.event_id", "e1")
            with tracer.start_as_current_span("checkpoint.saved process"):
                pass
        trace_id = f"{root.get_span_context().trace_id:032x}"
    with tracer.start_as_current_span("another trace"):
        pass
    return trace_id


def test_spans_are_written_and_read_back_by_trace(tmp_path: Path):
    trace_id = _record(tmp_path)
    spans = read_trace(tmp_path, trace_id)
    assert len(spans) == 6 and {s["trace_id"] for s in spans} == {trace_id}
    assert spans[0]["name"] == "root" and spans[0]["parent_id"] is None
    assert any(s["attributes"].get("flywheel.event_id") == "e1" for s in spans)


def test_repeated_siblings_fold_into_one_row(tmp_path: Path):
    spans = read_trace(tmp_path, _record(tmp_path))
    rows = [(depth, span["name"], n) for depth, span, n in span_rows(spans)]
    assert rows == [(0, "root", 1), (1, "training.progress publish", 3), (1, "checkpoint.saved publish", 1),
                    (2, "checkpoint.saved process", 1)]
    text = format_trace(spans)
    assert "training.progress publish ×3" in text and "flywheel-test" in text


def test_trace_id_from_headers():
    assert trace_id_from_headers({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) == \
        "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_from_headers({}) == "" and trace_id_from_headers(None) == ""
    assert format_trace([]) == "(no spans recorded)"
