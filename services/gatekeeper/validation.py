"""Validating one file, streamed: which checks run at each level, in which order.

quick     file   file_size, file_empty, gzip, binary, encoding, bom          (framing.py)
          line   line_size, blank_line, utf8, json, nesting, json_object     (framing.py, decoding.py)
          row    the schema's own checks: chat_sft_v1 messages_field, message_shape, role,
                 profile, extra_fields, content_nonempty, has_assistant, last_turn_assistant;
                 syllo_v1 the same but profile, plus puzzle; completion_v1 text_field,
                 extra_fields, content_nonempty                                (chat_sft.py, ...)
          end    no_rows
standard  template, token_length, token_truncation                           (standard.py)
          the length distribution in tokens, as the trainer encodes each row
deep      answer_format (rows with a profile)                                 (profiles.py)
          answer_leakage (chat schemas)                                        (leakage.py)
          exact_duplicate, accepted_duplicate, near_duplicate,
          accepted_near_duplicate, dedup_capacity                              (duplicates.py)

Every check of the level runs on every row that is still in (a row stops at its first
error); the report's `checks_run` lists them. Rows flow in blocks of about 64 KiB: read,
decoded, checked level by level, and written out normalised (`run`) or not at all (`check`:
a dry run, what `flywheel check` and `POST /datasets/check` answer), so memory does not grow
with the file (bar deep's duplicate index, which is capped). A `stop` event (the service is
shutting down) interrupts the run at the next block, deciding nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from libs.common.events import ValidationLevel
from services.gatekeeper.checks import (
    FILE_CHECKS,
    LINE_CHECKS,
    NO_ROWS,
    Batch,
    Check,
    Tally,
    runs_at,
)
from services.gatekeeper.decoding import decode_block
from services.gatekeeper.duplicates import DUPLICATE_CHECKS, Duplicates
from services.gatekeeper.fingerprints import Fingerprints, RecentIndex
from services.gatekeeper.framing import Limits, read_blocks
from services.gatekeeper.leakage import ANSWER_LEAKAGE, AnswerLeakage
from services.gatekeeper.lengths import LengthSummary
from services.gatekeeper.profiles import ANSWER_FORMAT, AnswerFormat
from services.gatekeeper.schemas import DEFAULT_SCHEMA, SCHEMAS, RowSchema
from services.gatekeeper.standard import STANDARD_CHECKS, Overlength, TokenLengths
from services.gatekeeper.tokens import TokenCounter


class ValidationInterrupted(Exception):
    """Validation was asked to stop before the end of the file; nothing was decided."""


@dataclass(frozen=True)
class ValidationConfig:
    limits: Limits = field(default_factory=Limits)
    max_length: int = 512
    overlength: Overlength = "truncate"
    near_duplicate_similarity: float = 0.8
    max_dedup_rows: int = 1_000_000
    leakage_min_chars: int = 16
    leakage_fraction: float = 0.5


@dataclass(frozen=True)
class Tools:
    """What the higher levels need, loaded only when a level asks for it."""

    tokens: Callable[[], TokenCounter]
    recent: Callable[[], RecentIndex] = lambda: RecentIndex([])


def checks_for(schema: RowSchema, level: ValidationLevel) -> list[Check]:
    """Every check that runs for `schema` at `level`, in order (submission checks excluded)."""
    checks = [*FILE_CHECKS, *LINE_CHECKS, *schema.checks]
    if runs_at("standard", level):
        checks += STANDARD_CHECKS
    if runs_at("deep", level):
        if schema.profiles:
            checks.append(ANSWER_FORMAT)
        if schema.kind == "chat":
            checks.append(ANSWER_LEAKAGE)
        checks += DUPLICATE_CHECKS
    return checks


def describe_schemas() -> list[dict]:
    """Every schema with the checks each level adds, for `GET /specs`."""
    out = []
    for schema in SCHEMAS.values():
        by_level, seen = {}, set()
        for level in ("quick", "standard", "deep"):
            added = [c for c in checks_for(schema, level) if c.name not in seen]  # type: ignore[arg-type]
            seen.update(c.name for c in added)
            by_level[level] = [c.describe() for c in added]
        out.append({"name": schema.name, "description": schema.description, "kind": schema.kind,
                    "default": schema.name == DEFAULT_SCHEMA, "checks": by_level})
    return out


class Validation:
    """One file through one schema at one level."""

    def __init__(self, schema: RowSchema, level: ValidationLevel, config: ValidationConfig, tally: Tally,
                 tools: Tools) -> None:
        self.schema = schema
        self.level = level
        self.config = config
        self.tally = tally
        self.checks_run = [c.name for c in checks_for(schema, level)]
        self._level_checks: list = []
        self._tokens: TokenLengths | None = None
        self.duplicates: Duplicates | None = None
        if runs_at("standard", level):
            self._tokens = TokenLengths(schema, tools.tokens(), config.max_length, config.overlength)
            self._level_checks.append(self._tokens)
        if runs_at("deep", level):
            if ANSWER_FORMAT.name in self.checks_run:
                self._level_checks.append(AnswerFormat(schema))
            if ANSWER_LEAKAGE.name in self.checks_run:
                self._level_checks.append(AnswerLeakage(
                    schema, min_chars=config.leakage_min_chars, min_fraction=config.leakage_fraction))
            # Last: only rows every other check kept are indexed as seen.
            self.duplicates = Duplicates(schema, tools.recent(), threshold=config.near_duplicate_similarity,
                                         max_rows=config.max_dedup_rows)
            self._level_checks.append(self.duplicates)

    def run(self, path: Path, stop: threading.Event | None = None) -> Iterator[bytes]:
        """Yield the normalised lines of the rows that pass, block by block; findings go to the tally."""
        schema = self.schema
        for rows, batch in self._checked(path, stop):
            if batch is None:
                yield schema.encode_lines(rows)
            elif batch.lines is not None:
                yield b"".join(batch.lines[i] + b"\n" for i in batch.live())
            else:
                yield schema.encode_lines([rows[i] for i in batch.live()] if batch.dropped else rows)

    def check(self, path: Path, stop: threading.Event | None = None,
              progress: Callable[[int], object] | None = None) -> None:
        """Every check of `run`, nothing written: the findings and counts alone (`flywheel check`).

        `progress` is called with each block's size in bytes (decompressed) as the block is taken up.
        """
        for _ in self._checked(path, stop, progress):
            pass

    def _checked(self, path: Path, stop: threading.Event | None,
                 progress: Callable[[int], object] | None = None) -> Iterator[tuple[list, Batch | None]]:
        """Each block's rows that passed the quick checks, and the batch the level checks marked (if any ran)."""
        schema, tally = self.schema, self.tally
        for block in read_blocks(path, self.config.limits, tally):
            if stop is not None and stop.is_set():
                raise ValidationInterrupted(f"stopped at line {block.first}")
            if progress is not None:
                progress(len(block.data))
            rows, numbers = decode_block(schema, block, tally)
            if not rows:
                continue
            if not self._level_checks:
                yield rows, None
                continue
            batch = Batch(rows, numbers, tally)
            for check in self._level_checks:
                check(batch)
            yield rows, batch
        for check in self._level_checks:
            check.finish(tally)
        if tally.num_rows == 0 and not tally.fatal:
            tally.add(0, NO_ROWS, "every line is blank")

    @property
    def lengths(self) -> LengthSummary | None:
        """The token length distribution (standard and deep; quick measures no tokens)."""
        return self._tokens.stats.summary() if self._tokens is not None else None

    def fingerprints(self) -> Fingerprints | None:
        """The kept rows' fingerprints (deep only), for the recent-datasets index."""
        return self.duplicates.fingerprints() if self.duplicates is not None else None
