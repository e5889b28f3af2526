"""How a block of lines becomes rows of the submission's schema (the quick level's line and row checks).

Fast path: the schema's strict decoder takes the whole block in one call (msgspec
`decode_lines`) when every line starts with `{` and ends with `}` (then no value spans two
lines, see `Block.braces_every_line`, and as many values as lines means one on each), else
line by line; then only the schema's cheap Python checks run.
Any line it refuses sends the whole block down the slow path, line by line:

1. blank_line   (warning) a blank line is skipped
2. strict       the schema's strict decoder takes the line as is, or
3. utf8         the line is valid UTF-8
4. json         one valid JSON value (a lone surrogate escape is named as such)
5. nesting      at most MAX_NESTING levels deep; deeper input stops the decoder before it
                can recurse far (msgspec raises RecursionError), and is reported, not crashed on
6. json_object  the value is an object
7. the schema's `from_object`: a precise finding for each structural problem
then the schema's row checks. A row is kept only when it has no error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from services.gatekeeper.chat_sft import Findings, kind_of
from services.gatekeeper.checks import BLANK_LINE, JSON, JSON_OBJECT, MAX_NESTING, NESTING, UTF8, Tally
from services.gatekeeper.framing import Block
from services.gatekeeper.schemas import RowSchema

_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F]")


_STRICT_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)


def decode_block(schema: RowSchema, block: Block, tally: Tally) -> tuple[list, Sequence[int]]:
    """The rows of `block` that pass the quick checks, and their line numbers."""
    rows = _decode_fast(schema, block)
    if rows is not None:
        numbers = range(block.first, block.first + len(rows))
        problems = schema.row_problems(rows)
        if not problems:
            tally.rows(len(rows), len(rows))
            return rows, numbers
        bad = set()
        for index, check, reason in problems:
            tally.add(numbers[index], check, reason)
            if check.severity == "error":
                bad.add(index)
        tally.rows(len(rows), len(rows) - len(bad))
        keep = [i for i in range(len(rows)) if i not in bad]
        return [rows[i] for i in keep], [numbers[i] for i in keep]
    return _decode_slowly(schema, block, tally)


def _decode_fast(schema: RowSchema, block: Block) -> list | None:
    """Every line strictly decoded, or None if any line needs the slow path."""
    try:
        if block.braces_every_line():
            # Each line holds whole values, at least one: as many values as lines means one each.
            rows = schema.decoder.decode_lines(block.data)
            return rows if len(rows) == len(block) else None
        return list(map(schema.decoder.decode, block.lines))
    except _STRICT_ERRORS:
        return None


def _decode_slowly(schema: RowSchema, block: Block, tally: Tally) -> tuple[list, list[int]]:
    rows, numbers = [], []
    for offset, line in enumerate(block.lines):
        number = block.first + offset
        if not line.strip():
            tally.add(number, BLANK_LINE, "blank line skipped")
            continue
        found: Findings = []
        try:
            row = schema.decoder.decode(line)
        except _STRICT_ERRORS:
            row = None
        if row is None:
            value = decode_object(line, found)
            row = None if value is None else schema.from_object(value, found)
        if row is not None:
            found.extend((check, reason) for _, check, reason in schema.row_problems([row]))
        valid = row is not None and not any(check.severity == "error" for check, _ in found)
        for check, reason in found:
            tally.add(number, check, reason)
        tally.rows(1, int(valid))
        if valid:
            rows.append(row)
            numbers.append(number)
    return rows, numbers


def decode_object(line: bytes, found: Findings) -> dict | None:
    """Decode generically and say precisely why the line is not a JSON object, if it is not."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        found.append((UTF8, f"invalid UTF-8 at byte {exc.start}: {exc.reason}"))
        return None
    try:
        value = msgspec.json.decode(line)
    except RecursionError:
        found.append((NESTING, f"JSON nested too deeply to decode (the limit is {MAX_NESTING} levels)"))
        return None
    except msgspec.DecodeError as exc:
        if _LONE_SURROGATE.search(line):
            found.append((JSON, "a \\u escape encodes a lone UTF-16 surrogate, which is not a character"))
        else:
            found.append((JSON, f"not valid JSON: {exc}"))
        return None
    if _deeper_than(value, MAX_NESTING):
        found.append((NESTING, f"JSON nested more than {MAX_NESTING} levels deep"))
        return None
    if not isinstance(value, dict):
        found.append((JSON_OBJECT, f"the line is {_article(value)}, expected a JSON object"))
        return None
    return value


def _article(value: object) -> str:
    return "an array" if isinstance(value, list) else kind_of(value)


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
