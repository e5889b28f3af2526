"""The acceptance policy: thresholds, no valid rows, fatal findings, warnings."""

from __future__ import annotations

import pytest

from services.gatekeeper.chat_sft import EXTRA_FIELDS, ROLE
from services.gatekeeper.checks import FILE_EMPTY, Tally
from services.gatekeeper.policy import decide
from services.gatekeeper.reports import check_reasons


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
