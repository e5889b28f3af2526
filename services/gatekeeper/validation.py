"""Streaming validation of one file: file checks, then line by line, yielding normalised rows.

The pipeline, in order (check names as they appear in reports; see `checks.py` and the
schema module for the row checks):

1. file      file_size, file_empty, binary (NUL bytes in the first 64 KiB), bom (warning:
             a leading UTF-8 BOM is stripped)
2. line      line_size, blank_line (warning), utf8, json, nesting, json_object
3. row       the schema's checks at the submission's level (chat_sft_v1: messages_field,
             message_shape, role, extra_fields, content_nonempty, has_assistant,
             last_turn_assistant; standard adds token_length, token_truncation); a row's
             rules stop at its first error
4. end       no_rows when nothing but blank lines was found

Memory stays bounded whatever the file size: a line is read at most max_line_bytes + 1 bytes
at a time (a longer one is skipped in chunks), and findings beyond the cap are only counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from libs.common.events import ValidationLevel
from services.gatekeeper.chat_sft import Findings, TokenBudget
from services.gatekeeper.checks import (
    BINARY,
    BLANK_LINE,
    BOM,
    FILE_EMPTY,
    FILE_SIZE,
    JSON,
    JSON_OBJECT,
    LINE_SIZE,
    MAX_NESTING,
    NESTING,
    NO_ROWS,
    UTF8,
    Tally,
)
from services.gatekeeper.schemas import RowSchema

_SNIFF_BYTES = 64 * 1024
_DRAIN_BYTES = 1 << 20
_STOP_EVERY = 1024
_BOM = b"\xef\xbb\xbf"


class ValidationInterrupted(Exception):
    """Validation was asked to stop before the end of the file; nothing was decided."""


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 1 << 20
    max_file_bytes: int = 1 << 30


def validate_file(
    path: Path,
    schema: RowSchema,
    level: ValidationLevel,
    limits: Limits,
    tally: Tally,
    tokens: Callable[[], TokenBudget],
    stop: threading.Event | None = None,
) -> Iterator[bytes]:
    """Yield the normalised line of every valid row of `path`; record everything in `tally`.

    `tokens` gives the tokenizer budget; it is only called when the level needs it. Setting
    `stop` (the service is shutting down) raises `ValidationInterrupted` within a few thousand lines.
    """
    size = Path(path).stat().st_size
    if size > limits.max_file_bytes:
        tally.add(0, FILE_SIZE, f"the file is {size} bytes, over the limit of {limits.max_file_bytes} bytes")
        return
    if size == 0:
        tally.add(0, FILE_EMPTY, "the file is empty")
        return
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
        nul = head.find(b"\0")
        if nul >= 0:
            tally.add(0, BINARY, f"NUL byte at offset {nul}: a binary file, not JSON lines")
            return
        fh.seek(0)
        if head.startswith(_BOM):
            tally.add(1, BOM, "a leading UTF-8 byte order mark was stripped")
            fh.seek(len(_BOM))
        rules = schema.rules(level, tokens)
        for number, line in _lines(fh, limits.max_line_bytes, tally):
            if stop is not None and number % _STOP_EVERY == 0 and stop.is_set():
                raise ValidationInterrupted(f"stopped at line {number}")
            if not line.strip():
                tally.add(number, BLANK_LINE, "blank line skipped")
                continue
            found: Findings = []
            row = schema.decode(line)
            if row is None:
                value = _decode_object(line, found)
                row = None if value is None else schema.from_object(value, found)
            if row is not None:
                for rule in rules:
                    found.extend(rule(row))
                    if _has_error(found):
                        break
            valid = row is not None and not _has_error(found)
            for check, reason in found:
                tally.add(number, check, reason)
            tally.row(valid)
            if valid:
                yield schema.encode(row) + b"\n"
    if tally.num_rows == 0:
        tally.add(0, NO_ROWS, "every line is blank")


def _lines(fh: BinaryIO, max_line_bytes: int, tally: Tally) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every line within the limit; longer lines become findings."""
    number = 0
    while line := fh.readline(max_line_bytes + 1):
        number += 1
        tally.num_lines = number
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            total = len(line)
            while chunk := fh.readline(_DRAIN_BYTES):
                total += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            tally.add(number, LINE_SIZE, f"the line is {total} bytes, over the limit of {max_line_bytes} bytes")
            tally.row(False)
            continue
        yield number, line


def _decode_object(line: bytes, found: Findings) -> dict | None:
    """The slow path: decode generically and say precisely why the line is not an object."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        found.append((UTF8, f"invalid UTF-8 at byte {exc.start}: {exc.reason}"))
        return None
    try:
        value = msgspec.json.decode(line)
    except RecursionError:
        found.append((NESTING, "JSON nested too deeply to decode"))
        return None
    except msgspec.DecodeError as exc:
        found.append((JSON, f"not valid JSON: {exc}"))
        return None
    if _deeper_than(value, MAX_NESTING):
        found.append((NESTING, f"JSON nested more than {MAX_NESTING} levels deep"))
        return None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")
        found.append((JSON_OBJECT, f"the line is {kind}, expected a JSON object"))
        return None
    return value


def _deeper_than(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _has_error(found: Findings) -> bool:
    return any(check.severity == "error" for check, _ in found)
