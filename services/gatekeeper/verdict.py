"""The verdict on a validated submission, the report that explains it, and the event that announces it.

The acceptance policy (`decide`):
- Any submission- or file-level error (unknown schema or data profile, uri outside the store,
  empty, binary, too large, a gzip bomb, no rows, ...) rejects the submission.
- Rows with errors are dropped (which row checks are errors is fixed per check: see
  checks/__init__.py and the modules it names). The file is rejected when no valid row
  remains, or when the share of rows with errors is above `max_error_fraction`: a file that is
  mostly wrong is more likely the wrong file than a few bad rows.
- Rows longer than max_length: the overlength setting, applied by the standard level
  (checks/standard.py), makes them errors ("reject") or warnings that the trainer truncates
  ("truncate", unless no answer token would survive).
- Warnings never reject.

The report: written for every submission, accepted or not, to the artifact store at
`reports/<submission_id>.json` (its `report_uri` travels in the event). It holds:
- the outcome and its reasons (the policy's verdict first, then each row check with errors:
  its count, its first line numbers and its first reason);
- counts: lines, rows, rows kept and dropped, errors, warnings;
- `checks_run`: every check the submission's level ran, and `findings`: per check its level,
  severity, complete count and first findings with line numbers;
- `lengths`: the length distribution (tokens at standard and deep);
- the policy in force, the original's uri and sha256, the accepted dataset's, the timing.

The announcement is derived from the report alone, so a redelivered submission whose report
exists is announced again identically, without validating twice. `DatasetRejected.reasons`
carries the report's reasons; `DatasetAccepted` its counts, report_uri and data profile. Event ids are
deterministic: `DatasetAccepted` from the dataset id (JetStream drops a republished acceptance
inside its duplicate window), `DatasetRejected` from the submission id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import msgspec

from libs.common import topology
from libs.common.events import DatasetAccepted, DatasetRejected, Event, Priority, ValidationLevel, derived_id
from services.gatekeeper.checks import CheckFindings, Tally
from services.gatekeeper.checks.standard import LengthSummary

Status = Literal["accepted", "rejected", "duplicate"]
# Reasons in an event stay short; the report has everything.
_MAX_REASONS = 12
_LINES_SHOWN = 5

# ---------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reasons: list[str] = field(default_factory=list)


def decide(tally: Tally, max_error_fraction: float) -> Decision:
    if tally.fatal:
        return Decision(False, list(tally.fatal))
    if tally.num_rows_valid == 0:
        return Decision(False, [
            f"no valid rows: all {tally.num_rows} rows have errors; most common: {tally.most_common_errors()}"
        ])
    if tally.error_fraction > max_error_fraction:
        return Decision(False, [
            f"{tally.num_rows_dropped} of {tally.num_rows} rows ({tally.error_fraction:.1%}) have errors, "
            f"above the limit of {max_error_fraction:.1%}; most common: {tally.most_common_errors()}"
        ])
    return Decision(True)


# ---------------------------------------------------------------------------- the report and its announcement


class Report(msgspec.Struct, kw_only=True):
    submission_id: str
    status: Status
    name: str
    schema: str
    level: ValidationLevel
    priority: Priority
    channel: str
    submitted_by: str
    # Where the bytes came from: "inline", the announced uri, the uploaded or inbox file name.
    source: str
    started_at: datetime
    # The data profile the submission named (libs.common.profiles), as named even when unknown.
    profile: str = "none"
    reasons: list[str] = []
    dataset_id: str = ""
    dataset_uri: str = ""
    # For a duplicate: the submission whose acceptance of the same dataset came first.
    duplicate_of: str = ""
    original_uri: str = ""
    original_sha256: str = ""
    original_bytes: int = 0
    report_uri: str = ""
    num_lines: int = 0
    num_rows: int = 0
    num_rows_valid: int = 0
    num_rows_dropped: int = 0
    num_errors: int = 0
    num_warnings: int = 0
    error_fraction: float = 0.0
    policy: dict[str, Any] = {}
    checks_run: list[str] = []
    counts: dict[str, int] = {}
    findings: dict[str, CheckFindings] = {}
    lengths: LengthSummary | None = None
    duration_s: float = 0.0
    rows_per_second: float = 0.0

    def summary(self, shown: int = 5) -> dict[str, Any]:
        """The report with each check's findings cut to the first `shown`."""
        out = msgspec.to_builtins(self)
        for found in out["findings"].values():
            found["findings"] = found["findings"][:shown]
        return out


def check_reasons(tally: Tally) -> list[str]:
    """One line per check with errors, most frequent first: count, first lines, first reason."""
    lines = []
    errors = [(name, f) for name, f in tally.checks.items() if f.severity == "error" and f.scope in ("line", "row")]
    for name, found in sorted(errors, key=lambda item: -item[1].count):
        where = ", ".join(str(f.line) for f in found.findings[:_LINES_SHOWN])
        more = ", ..." if found.count > _LINES_SHOWN else ""
        noun = "row" if found.count == 1 else "rows"
        lines.append(f"{name}: {found.count} {noun} (line {where}{more}): {found.findings[0].reason}")
    return lines


def encode_report(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def decode_report(data: bytes) -> Report:
    return msgspec.json.decode(data, type=Report)


def accepted_event_id(dataset_id: str) -> str:
    return derived_id("gatekeeper", "accepted", dataset_id)


def announcement(report: Report) -> tuple[str, Event]:
    """The subject and event that announce `report`'s outcome."""
    if report.status == "accepted":
        return topology.dataset_accepted(report.priority), DatasetAccepted(
            id=accepted_event_id(report.dataset_id),
            dataset_id=report.dataset_id,
            name=report.name,
            uri=report.dataset_uri,
            sha256=report.dataset_id,
            schema=report.schema,
            priority=report.priority,
            num_rows=report.num_rows_valid,
            num_rows_dropped=report.num_rows_dropped,
            report_uri=report.report_uri,
            submission_id=report.submission_id,
            channel=report.channel,
            submitted_by=report.submitted_by,
            profile=report.profile,
        )
    return topology.DATASET_REJECTED, DatasetRejected(
        id=derived_id("gatekeeper", "rejected", report.submission_id),
        name=report.name,
        reasons=report.reasons[:_MAX_REASONS],
        report_uri=report.report_uri,
        submission_id=report.submission_id,
        dataset_id=report.dataset_id,
        num_errors=report.num_errors,
        channel=report.channel,
        submitted_by=report.submitted_by,
    )
