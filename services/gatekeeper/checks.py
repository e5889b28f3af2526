"""What a validation check is, what it finds, and how findings are tallied into a report.

A check has a stable name (it appears in reports, events and tests), a level and a severity.
Levels nest: `quick` checks structure only; `standard` adds what needs the base model's
tokenizer; `deep` adds costlier content checks (none yet, so deep = standard today). A
submission runs every check at or below its level. Errors drop the row (or, for file and
submission checks, reject the whole submission); warnings are recorded and change nothing.

The checks shared by every schema live here; each schema adds its own row checks
(see `chat_sft.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import msgspec

from libs.common.events import ValidationLevel

Severity = Literal["error", "warning"]
Scope = Literal["submission", "file", "line", "row"]
LEVELS: tuple[ValidationLevel, ...] = ("quick", "standard", "deep")


def runs_at(check_level: ValidationLevel, requested: ValidationLevel) -> bool:
    """Whether a check of `check_level` runs for a submission validated at `requested`."""
    return LEVELS.index(check_level) <= LEVELS.index(requested)


@dataclass(frozen=True)
class Check:
    name: str
    level: ValidationLevel
    severity: Severity
    scope: Scope
    description: str


# ---------------------------------------------------------------------------- shared checks
# Submission: decided before a byte is read.
SUBMISSION = Check("submission", "quick", "error", "submission", "exactly one of inline rows or a uri is given")
SCHEMA = Check("schema", "quick", "error", "submission", "the named schema is one the gatekeeper knows")
URI = Check("uri", "quick", "error", "submission", "a uri is file:// inside the artifact store and exists")
SHA256 = Check("sha256", "quick", "error", "submission", "the content matches the announced sha256")
# File: one finding rejects the whole file.
FILE_SIZE = Check("file_size", "quick", "error", "file", "the file is at most max_file_bytes")
FILE_EMPTY = Check("file_empty", "quick", "error", "file", "the file has content")
BINARY = Check("binary", "quick", "error", "file", "the file is text (no NUL bytes at its start)")
BOM = Check("bom", "quick", "warning", "file", "a leading UTF-8 byte order mark is stripped")
NO_ROWS = Check("no_rows", "quick", "error", "file", "at least one non-blank line")
# Line: one JSON object per line.
LINE_SIZE = Check("line_size", "quick", "error", "line", "a line is at most max_line_bytes")
BLANK_LINE = Check("blank_line", "quick", "warning", "line", "blank lines are skipped")
UTF8 = Check("utf8", "quick", "error", "line", "a line is valid UTF-8")
JSON = Check("json", "quick", "error", "line", "a line is one valid JSON value")
# A chat row needs 3 levels; anything much deeper is garbage or an attack on the decoder.
MAX_NESTING = 32
NESTING = Check("nesting", "quick", "error", "line", f"JSON nesting is at most {MAX_NESTING} levels deep")
JSON_OBJECT = Check("json_object", "quick", "error", "line", "a line is a JSON object (not an array, string, ...)")

SHARED_CHECKS: tuple[Check, ...] = (
    SUBMISSION, SCHEMA, URI, SHA256, FILE_SIZE, FILE_EMPTY, BINARY, BOM, NO_ROWS,
    LINE_SIZE, BLANK_LINE, UTF8, JSON, NESTING, JSON_OBJECT,
)


class Finding(msgspec.Struct, frozen=True):
    """One problem: where (line 0 = the submission or the file as a whole), which check, why."""

    line: int
    check: str
    severity: Severity
    reason: str


class Tally:
    """Counts and (capped) findings of one validation run: bounded memory for any file size."""

    def __init__(self, max_findings: int) -> None:
        self.max_findings = max_findings
        self.findings: list[Finding] = []
        self.counts: Counter[str] = Counter()
        self.error_counts: Counter[str] = Counter()
        self.num_findings = 0
        self.num_errors = 0
        self.num_warnings = 0
        self.num_lines = 0
        self.num_rows = 0
        self.num_rows_valid = 0
        # Findings that condemn the submission or file as a whole.
        self.fatal: list[Finding] = []

    def add(self, line: int, check: Check, reason: str) -> None:
        finding = Finding(line=line, check=check.name, severity=check.severity, reason=reason)
        self.counts[check.name] += 1
        self.num_findings += 1
        if check.severity == "error":
            self.num_errors += 1
            self.error_counts[check.name] += 1
            if check.scope in ("submission", "file"):
                self.fatal.append(finding)
        else:
            self.num_warnings += 1
        if len(self.findings) < self.max_findings:
            self.findings.append(finding)

    def row(self, valid: bool) -> None:
        self.num_rows += 1
        self.num_rows_valid += valid

    @property
    def num_rows_dropped(self) -> int:
        return self.num_rows - self.num_rows_valid

    @property
    def error_fraction(self) -> float:
        return self.num_rows_dropped / self.num_rows if self.num_rows else 0.0

    def most_common_errors(self, n: int = 3) -> str:
        return ", ".join(f"{name} ({count})" for name, count in self.error_counts.most_common(n))
