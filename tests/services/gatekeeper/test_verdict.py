"""The verdict and the report that explains it.

The acceptance policy: thresholds, no valid rows, fatal findings, warnings. Reports: stored for
every outcome, summarised in events, and shown by `flywheel submit`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from flywheel.submit import describe_report, read_report
from libs.common.models import load_tokenizer
from services.gatekeeper.checks import FILE_EMPTY, Tally
from services.gatekeeper.checks.standard import TokenCounter
from services.gatekeeper.schemas import EXTRA_FIELDS, ROLE
from services.gatekeeper.verdict import announcement, check_reasons, decide, decode_report
from tests.services.gatekeeper.samples import chat, good_rows, make_gatekeeper, submission

# ---------------------------------------------------------------------------- the policy


def tally(valid: int, bad: int, *, warnings: int = 0) -> Tally:
    t = Tally(max_findings=100)
    for i in range(bad):
        t.add(i + 1, ROLE, "bad role")
    t.rows(valid + bad, valid)
    for i in range(warnings):
        t.add(i + 1, EXTRA_FIELDS, "dropped")
    return t


@pytest.mark.parametrize(("valid", "bad", "limit", "accepted"), [
    (10, 0, 0.1, True),
    (9, 1, 0.1, True),    # exactly at the limit
    (8, 2, 0.1, False),   # above it
    (99, 1, 0.0, False),  # zero tolerance
    (1, 9, 0.95, True),
    (0, 3, 1.0, False),   # nothing left to train on, whatever the limit
])
def test_error_fraction_threshold(valid, bad, limit, accepted):
    decision = decide(tally(valid, bad), limit)
    assert decision.accepted is accepted
    assert bool(decision.reasons) is not accepted


def test_rejection_reason_names_the_share_and_the_commonest_check():
    [reason] = decide(tally(3, 2), 0.1).reasons
    assert "2 of 5 rows (40.0%)" in reason and "limit of 10.0%" in reason and "role (2)" in reason


def test_no_valid_rows_is_rejected_with_its_own_reason():
    [reason] = decide(tally(0, 4), 1.0).reasons
    assert reason.startswith("no valid rows") and "role (4)" in reason


def test_a_fatal_finding_rejects_even_without_rows():
    t = Tally(max_findings=10)
    t.add(0, FILE_EMPTY, "the file is empty")
    assert decide(t, 1.0).reasons == ["file_empty: the file is empty"]


def test_warnings_never_reject():
    assert decide(tally(5, 0, warnings=50), 0.0).accepted


def test_report_reasons_name_each_check_with_its_first_lines():
    t = tally(3, 7)
    assert check_reasons(t) == ["role: 7 rows (line 1, 2, 3, 4, 5, ...): bad role"]
    t.add(9, FILE_EMPTY, "file-level findings are the verdict's, not listed per check")
    assert check_reasons(t) == ["role: 7 rows (line 1, 2, 3, 4, 5, ...): bad role"]


# ---------------------------------------------------------------------------- the report


@pytest.mark.slow  # loads the tiny tokenizer
def test_a_report_holds_counts_findings_per_check_with_lines_and_lengths(tmp_path: Path, tiny_model_dir: Path):
    counter = TokenCounter(load_tokenizer(tiny_model_dir))
    gk = make_gatekeeper(tmp_path, tokens=lambda: counter, max_error_fraction=0.5)
    rows = good_rows(20) + [chat(("user", "hi"), ("bot", "x"))] * 3 + [chat(("user", "q"), ("assistant", "7 " * 400))]  # one token per digit: far over max_length
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
