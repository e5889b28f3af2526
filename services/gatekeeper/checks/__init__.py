"""What a check is, the one protocol the standard and deep checks implement, and the tally of findings.

A check has a stable name (it appears in reports, events and tests), a level, a severity and
a scope. Levels nest: a submission validated at `standard` runs every quick and standard
check. An error drops its row (row and line scope) or rejects the submission (submission and
file scope); a warning is recorded and changes nothing. Whether a file with dropped rows is
still accepted is the verdict's decision (verdict.py).

The checks of each level, in the order a row meets them, and where they are made:

quick     submission  submission, schema, data_profile, uri, sha256     declared here, made in pipeline.py
          file        file_size, file_empty, gzip, binary, encoding,    declared here, made in reading.py
                      bom; no_rows                                      (no_rows: pipeline.py)
          line        line_size, blank_line, utf8, json, nesting,       declared here, made in reading.py
                      json_object
          row         each schema's own                                 schemas.py
standard  held_out (chat schemas)                                      checks/held_out.py
          template, token_length, token_truncation                      checks/standard.py
deep      answer_format, answer_leakage                                 checks/deep.py
          exact_duplicate, accepted_duplicate, near_duplicate,          duplicates.py
          accepted_near_duplicate, dedup_capacity

The quick checks decide which rows exist at all, so they are made while the bytes are read and
decoded. Every check after them is a `LevelCheck`: it sees each `Batch` of rows that passed
the quick checks, in file order, drops or warns about rows, and may report once the whole file
has been seen. A level is the list of its LevelChecks, run in order on every batch
(`pipeline.Validation`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    def describe(self) -> dict:
        return {"name": self.name, "level": self.level, "severity": self.severity, "scope": self.scope,
                "description": self.description}


class LevelCheck(ABC):
    """A standard or deep check: it sees every batch of rows that passed the quick checks, in file order."""

    @abstractmethod
    def __call__(self, batch: Batch) -> None:
        """Look at the batch's live rows: `batch.error` drops a row, `batch.warn` keeps it."""

    def finish(self, tally: Tally) -> None:
        """Report what only the whole file shows, once its last batch has been seen (most checks: nothing)."""


# ---------------------------------------------------------------------------- the quick checks every schema shares
# Submission: decided before a byte is read.
SUBMISSION = Check("submission", "quick", "error", "submission", "exactly one of inline rows or a uri is given")
SCHEMA = Check("schema", "quick", "error", "submission", "the named schema is one the gatekeeper knows")
DATA_PROFILE = Check(
    "data_profile", "quick", "error", "submission",
    "the named data profile (libs.common.profiles) is known, and only a chat schema names one other than none",
)
URI = Check("uri", "quick", "error", "submission", "a uri is file:// inside the artifact store and exists")
SHA256 = Check("sha256", "quick", "error", "submission", "the content matches the announced sha256")
# File: one finding rejects the whole file.
FILE_SIZE = Check(
    "file_size", "quick", "error", "file", "the file is at most max_file_bytes, and so is a gzip file decompressed"
)
FILE_EMPTY = Check("file_empty", "quick", "error", "file", "the file has content")
GZIP = Check("gzip", "quick", "error", "file", "a gzip file (found by its magic bytes) decompresses cleanly")
BINARY = Check(
    "binary", "quick", "error", "file",
    "the file is text: no NUL byte in its first 64 KiB, not a zip/bzip2/xz/zstd archive, image, PDF or executable",
)
ENCODING = Check("encoding", "quick", "error", "file", "the file is UTF-8, not UTF-16 or UTF-32")
BOM = Check("bom", "quick", "warning", "file", "a leading UTF-8 byte order mark is stripped")
NO_ROWS = Check("no_rows", "quick", "error", "file", "at least one non-blank line")
# Line: one JSON object per line.
LINE_SIZE = Check(
    "line_size", "quick", "error", "line", "a line is at most max_line_bytes (longer ones are skipped unread)"
)
BLANK_LINE = Check("blank_line", "quick", "warning", "line", "blank lines are skipped")
UTF8 = Check("utf8", "quick", "error", "line", "a line is valid UTF-8")
JSON = Check("json", "quick", "error", "line", "a line is one valid JSON value (no lone surrogate escapes)")
# A chat row needs 3 levels; anything much deeper is garbage or an attack on the decoder.
MAX_NESTING = 32
NESTING = Check("nesting", "quick", "error", "line", f"JSON nesting is at most {MAX_NESTING} levels deep")
JSON_OBJECT = Check("json_object", "quick", "error", "line", "a line is a JSON object (not an array, string, ...)")

SUBMISSION_CHECKS: tuple[Check, ...] = (SUBMISSION, SCHEMA, DATA_PROFILE, URI, SHA256)
FILE_CHECKS: tuple[Check, ...] = (FILE_SIZE, FILE_EMPTY, GZIP, BINARY, ENCODING, BOM, NO_ROWS)
LINE_CHECKS: tuple[Check, ...] = (LINE_SIZE, BLANK_LINE, UTF8, JSON, NESTING, JSON_OBJECT)
SHARED_CHECKS: tuple[Check, ...] = (*SUBMISSION_CHECKS, *FILE_CHECKS, *LINE_CHECKS)


# ---------------------------------------------------------------------------- findings, tallied


class Finding(msgspec.Struct, frozen=True):
    """Where (line 0 = the submission or the file as a whole) and why."""

    line: int
    reason: str


class CheckFindings(msgspec.Struct, kw_only=True):
    """One check's findings in a report: the complete count, the first findings with their lines."""

    level: ValidationLevel
    severity: Severity
    scope: Scope
    count: int = 0
    findings: list[Finding] = []


class Tally:
    """Counts and (capped) findings of one validation run: bounded memory for any file size.

    Every check's count is complete; each check keeps its first `max_findings` findings, so a
    check that fires on every row cannot crowd the others out of the report.
    """

    def __init__(self, max_findings: int) -> None:
        self.max_findings = max_findings
        self.checks: dict[str, CheckFindings] = {}
        self.error_counts: Counter[str] = Counter()
        self.num_errors = 0
        self.num_warnings = 0
        self.num_lines = 0
        self.num_rows = 0
        self.num_rows_valid = 0
        # Findings that condemn the submission or file as a whole, as "check: reason".
        self.fatal: list[str] = []

    def add(self, line: int, check: Check, reason: str) -> None:
        found = self.checks.get(check.name)
        if found is None:
            found = self.checks[check.name] = CheckFindings(level=check.level, severity=check.severity,
                                                           scope=check.scope, findings=[])
        found.count += 1
        if len(found.findings) < self.max_findings:
            found.findings.append(Finding(line, reason))
        if check.severity == "error":
            self.num_errors += 1
            self.error_counts[check.name] += 1
            if check.scope in ("submission", "file"):
                self.fatal.append(f"{check.name}: {reason}")
        else:
            self.num_warnings += 1

    def rows(self, total: int, valid: int) -> None:
        self.num_rows += total
        self.num_rows_valid += valid

    @property
    def counts(self) -> dict[str, int]:
        return {name: found.count for name, found in self.checks.items()}

    @property
    def num_rows_dropped(self) -> int:
        return self.num_rows - self.num_rows_valid

    @property
    def error_fraction(self) -> float:
        return self.num_rows_dropped / self.num_rows if self.num_rows else 0.0

    def most_common_errors(self, n: int = 3) -> str:
        return ", ".join(f"{name} ({count})" for name, count in self.error_counts.most_common(n))


class Batch:
    """A block's rows that passed the quick checks, on their way through the level checks.

    An error drops the row (and later checks skip it); a warning keeps it.
    """

    def __init__(self, rows: list, numbers, tally: Tally) -> None:
        self.rows = rows
        self.numbers = numbers  # line number of each row
        self.tally = tally
        self.dropped: set[int] = set()
        # The rows' normalised lines, once a check needed them (duplicates does).
        self.lines: list[bytes] | None = None

    def live(self) -> list[int]:
        """Indices of the rows still in."""
        if not self.dropped:
            return list(range(len(self.rows)))
        return [i for i in range(len(self.rows)) if i not in self.dropped]

    def error(self, index: int, check: Check, reason: str) -> None:
        self.tally.add(self.numbers[index], check, reason)
        if index not in self.dropped:
            self.dropped.add(index)
            self.tally.num_rows_valid -= 1

    def warn(self, index: int, check: Check, reason: str) -> None:
        self.tally.add(self.numbers[index], check, reason)

