"""`spans`: the spans this process finishes during a test, in memory (the real SDK pipeline)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.common.tracing import setup_tracing


@pytest.fixture
def spans():
    """The process's tracer provider (made here if no test made it yet) also keeps finished spans in memory.

    Ask for it before any fixture that loads a model, so the "model load" span is recorded.
    """
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    setup_tracing("test", None).add_span_processor(processor)
    yield exporter
    processor.shutdown()  # the provider keeps the processor; a stopped exporter drops what comes later
