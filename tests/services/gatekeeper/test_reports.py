"""Reports: stored for every outcome, summarised in events, and shown by `flywheel submit`."""

from __future__ import annotations

from pathlib import Path

import msgspec

from flywheel.submit import describe_report, read_report
from libs.common.models import load_tokenizer
from services.gatekeeper.reports import announcement, decode_report
from services.gatekeeper.tokens import TokenCounter
from tests.services.gatekeeper.samples import chat, good_rows, make_gatekeeper, submission


def test_a_report_holds_counts_findings_per_check_with_lines_and_lengths(tmp_path: Path, tiny_model_dir: Path):
    counter = TokenCounter(load_tokenizer(tiny_model_dir))
    gk = make_gatekeeper(tmp_path, tokens=lambda: counter, max_error_fraction=0.5)
    rows = good_rows(20) + [chat(("user", "hi"), ("bot", "x"))] * 3 + [chat(("user", "q"), ("assistant", "a " * 300))]
    report = gk.submit_rows(submission("s", level="standard"), rows)
    stored = decode_report(gk.store.path_for(report.report_uri).read_bytes())
    assert stored == report and report.status == "accepted"
    assert (report.num_rows, report.num_rows_valid, report.num_rows_dropped) == (24, 21, 3)
    assert [f.line for f in report.findings["role"].findings] == [21, 22, 23]
    assert report.findings["token_truncation"].severity == "warning"
    assert report.lengths.count == 21 and sum(b.count for b in report.lengths.histogram) == 21
    assert "token_length" in report.checks_run and report.policy["overlength"] == "truncate"
    subject, event = announcement(report)
    assert subject == "dataset.accepted.normal" and (event.num_rows, event.num_rows_dropped) == (21, 3)
    assert event.report_uri == report.report_uri

    shown = describe_report(msgspec.to_builtins(report))
    assert "24 read, 21 kept, 3 dropped" in shown and "level standard" in shown
    assert "role" in shown and "line 21, 22, 23" in shown and "messages[1].role is 'bot'" in shown
    assert "token_truncation" in shown and "tokens per row (max_length 512)" in shown and ">512" in shown
    assert read_report(gk.store, report.report_uri) == msgspec.to_builtins(report)
    assert read_report(gk.store, "file:///elsewhere/report.json") is None


def test_a_rejection_event_carries_the_reasons_per_check(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    report = gk.submit_rows(submission("bad"), [chat(("user", "hi"))] * 2 + [{"messages": "x"}] + good_rows(1))
    _, event = announcement(report)
    assert event.reasons == [
        "3 of 4 rows (75.0%) have errors, above the limit of 10.0%; most common: has_assistant (2), messages_field (1)",
        "has_assistant: 2 rows (line 1, 2): no assistant turn: nothing to train on",
        "messages_field: 1 row (line 3): `messages` is a string, expected a list",
    ]
    assert "has_assistant" in describe_report(msgspec.to_builtins(report))
