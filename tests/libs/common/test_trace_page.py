from libs.common.trace_page import render_trace_page

SPANS = [
    {"trace_id": "t" * 32, "span_id": "a", "parent_id": None, "name": "flywheel submit", "service": "flywheel-cli",
     "start_ns": 0, "end_ns": 10, "status": "UNSET", "attributes": {}},
    {"trace_id": "t" * 32, "span_id": "b", "parent_id": "a", "name": "dataset.submitted process",
     "service": "flywheel-gatekeeper", "start_ns": 5, "end_ns": 2_000_000_000, "status": "ERROR",
     "attributes": {"flywheel.event_id": "<script>"}},
]


def test_page_shows_every_span_with_services_and_escapes_attributes():
    page = render_trace_page("t" * 32, SPANS)
    assert page.startswith("<!doctype html>")
    assert "flywheel submit" in page and "dataset.submitted process" in page
    assert "flywheel-gatekeeper" in page and 'class="error"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "2 spans across 2 services" in page


def test_empty_trace_says_so():
    assert "No spans recorded" in render_trace_page("abc", [])
