"""How a submitted file's bytes become rows of its schema, in bounded memory: the quick file and line checks.

Bytes to lines. Before the first line (file checks):
- file_size   the file is at most max_file_bytes; a gzip file is also counted as it is
              decompressed, so a gzip bomb stops at the limit ("decompressed size exceeds ...")
- file_empty  the file (or what a gzip file decompresses to) has content
- gzip        gzip is recognised by its magic bytes, whatever the file's name, and read
              through the decompressor; a corrupt stream rejects the file
- binary      a NUL byte in the first 64 KiB, or the signature of a zip/bzip2/xz/zstd
              archive, image, PDF or executable (named in the reason)
- encoding    a UTF-16 or UTF-32 byte order mark
- bom         (warning) a leading UTF-8 byte order mark is stripped
Then, per line:
- line_size   a line (newline excluded) is at most max_line_bytes; a longer one is skipped
              chunk by chunk, never held whole, and the lines after it are read normally
Memory: one 64 KiB chunk plus at most max_line_bytes of a line being assembled. Lines come
in blocks of consecutive lines (one chunk's worth): small enough that what is decoded from a
block dies young (cheap for the garbage collector), large enough to batch the tokenizer.

Lines to rows (`decode_block`). Fast path: the schema's strict decoder takes the whole block
in one call (msgspec `decode_lines`) when every line starts with `{` and ends with `}` (then no
value spans two lines, see `Block.braces_every_line`, and as many values as lines means one on
each), else line by line; then only the schema's cheap Python checks run. Any line it refuses
sends the whole block down the slow path, line by line:
1. blank_line   (warning) a blank line is skipped
2. strict       the schema's strict decoder takes the line as is, or
3. utf8         the line is valid UTF-8
4. json         one valid JSON value (a lone surrogate escape is named as such)
5. nesting      at most MAX_NESTING levels deep; deeper input stops the decoder before it
                can recurse far (msgspec raises RecursionError), and is reported, not crashed on
6. json_object  the value is an object
7. the schema's `from_object`: a precise finding for each structural problem
then the schema's row checks (schemas.py). A row is kept only when it has no error.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import numpy as np

from services.gatekeeper.checks import (
    BINARY,
    BLANK_LINE,
    BOM,
    ENCODING,
    FILE_EMPTY,
    FILE_SIZE,
    GZIP,
    JSON,
    JSON_OBJECT,
    LINE_SIZE,
    MAX_NESTING,
    NESTING,
    UTF8,
    Tally,
)
from services.gatekeeper.schemas import Findings, RowSchema, kind_of

# ---------------------------------------------------------------------------- bytes to lines

CHUNK_BYTES = 64 * 1024
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_NEWLINE = ord("\n")
_OPEN, _CLOSE = ord("{"), ord("}")
_SNIFF_BYTES = 64 * 1024
_SIGNATURES = (
    (b"PK\x03\x04", "a zip archive"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
)
# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_UTF_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
)


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 1 << 20
    max_file_bytes: int = 1 << 30


class Block:
    """Consecutive lines of the file: their bytes as read, and how many lines they hold."""

    __slots__ = ("first", "data", "_newlines", "_count", "_lines")

    def __init__(self, first: int, data: bytes) -> None:
        self.first = first  # the line number (1-based) of the first line
        self.data = data  # the lines, each ended by a newline (the file's last may not be)
        self._newlines = np.frombuffer(data, np.uint8) == _NEWLINE
        self._count = int(np.count_nonzero(self._newlines)) + (not data.endswith(b"\n"))
        self._lines: list[bytes] | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def lines(self) -> list[bytes]:
        """The lines without their newlines (split on first use: the fast path never needs them)."""
        if self._lines is None:
            data = self.data[:-1] if self.data.endswith(b"\n") else self.data
            self._lines = data.split(b"\n")
        return self._lines

    def braces_every_line(self) -> bool:
        """Whether every line starts with `{` and ends with `}` (no blank, indented or padded line).

        Then no JSON value can run past the end of a line: a string cannot hold a raw newline,
        and inside an object or array a `}` is followed by `,`, `}` or `]`, never by the `{`
        that opens the next line. So each line holds whole values only, at least one.
        """
        view = np.frombuffer(self.data, np.uint8)
        body = view[:-1] if self.data.endswith(b"\n") else view  # without the last newline
        if body.size == 0 or body[0] != _OPEN or body[-1] != _CLOSE:
            return False
        inner = self._newlines[:body.size]  # the newlines between lines
        between = self._count - 1
        return bool(np.count_nonzero(inner[1:] & (body[:-1] == _CLOSE)) == between
                    and np.count_nonzero(inner[:-1] & (body[1:] == _OPEN)) == between)

    def lengths(self) -> np.ndarray:
        """Each line's length in bytes, its newline excluded."""
        ends = np.flatnonzero(self._newlines)
        if not self.data.endswith(b"\n"):
            ends = np.append(ends, len(self.data))
        return np.diff(ends, prepend=-1) - 1


def read_blocks(path: Path, limits: Limits, tally: Tally) -> Iterator[Block]:
    """Yield `path`'s lines in blocks; file and line_size findings go to `tally`."""
    size = Path(path).stat().st_size
    if size > limits.max_file_bytes:
        tally.add(0, FILE_SIZE, f"the file is {size} bytes, over the limit of {limits.max_file_bytes} bytes")
        return
    if size == 0:
        tally.add(0, FILE_EMPTY, "the file is empty")
        return
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            yield from _frame(raw, limits, tally, compressed=False)
            return
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield from _frame(unzipped, limits, tally, compressed=True)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            tally.add(0, GZIP, f"the gzip stream is corrupt: {exc}")


def _frame(source: BinaryIO, limits: Limits, tally: Tally, *, compressed: bool) -> Iterator[Block]:
    read = _capped_reader(source, limits.max_file_bytes)
    head = read()
    if head is None:
        tally.add(0, FILE_SIZE, _over_limit(limits, compressed))
        return
    if not head:
        tally.add(0, FILE_EMPTY, "the gzip file decompresses to nothing")
        return
    if problem := _sniff(head):
        tally.add(0, *problem)
        return
    if head.startswith(UTF8_BOM):
        tally.add(1, BOM, "a leading UTF-8 byte order mark was stripped")
        head = head[len(UTF8_BOM):]

    max_line = limits.max_line_bytes
    number = 0  # lines completed so far
    pending = b""  # the start of the current line, not yet ended by a newline
    skipped = 0  # > 0: inside an over-long line, this many bytes of it seen so far
    chunk: bytes | None = head
    while chunk:
        if skipped:
            newline = chunk.find(b"\n")
            if newline < 0:
                skipped += len(chunk)
                chunk = read()
                continue
            number += 1
            _too_long(tally, number, skipped + newline, max_line)
            skipped, chunk = 0, chunk[newline + 1:]
            if not chunk:
                chunk = read()
                continue
        cut = chunk.rfind(b"\n")
        if cut < 0:
            pending += chunk
            if len(pending) > max_line:
                skipped, pending = len(pending), b""
            chunk = read()
            continue
        # One copy: the pending start of a line and this chunk's complete lines, joined.
        block = Block(number + 1, b"".join((pending, memoryview(chunk)[:cut + 1])))
        pending = chunk[cut + 1:]
        if len(pending) > max_line:
            skipped, pending = len(pending), b""
        # Only a line begun in an earlier chunk, or any line when max_line < a chunk, can be too long.
        if max_line < CHUNK_BYTES or len(block.data) > max_line:
            yield from _within_limit(block, max_line, tally)
        else:
            yield block
        number += len(block)
        tally.num_lines = number
        chunk = read()
    if chunk is None:
        tally.add(0, FILE_SIZE, _over_limit(limits, compressed))
    elif skipped:
        _too_long(tally, number + 1, skipped, max_line)
        number += 1
    elif pending:  # a last line without a newline
        yield from _within_limit(Block(number + 1, pending), max_line, tally)
        number += 1
    tally.num_lines = number


def _capped_reader(source: BinaryIO, limit: int):
    """A chunk reader returning None once more than `limit` bytes came out (a gzip bomb, a growing file)."""
    total = 0

    def read() -> bytes | None:
        nonlocal total
        chunk = source.read(CHUNK_BYTES)
        total += len(chunk)
        return None if total > limit else chunk

    return read


def _over_limit(limits: Limits, compressed: bool) -> str:
    if compressed:
        return f"decompressed size exceeds the limit of {limits.max_file_bytes} bytes (max_file_bytes)"
    return f"the file grew past the limit of {limits.max_file_bytes} bytes while it was read"


def _sniff(head: bytes):
    for bom, name in _UTF_BOMS:
        if head.startswith(bom):
            return ENCODING, f"the file is {name} (byte order mark {bom.hex(' ')}); only UTF-8 is accepted"
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            return BINARY, f"the file is {what}, not JSON lines (only gzip compression is accepted)"
    nul = head.find(b"\0", 0, _SNIFF_BYTES)
    if nul >= 0:
        return BINARY, f"NUL byte at offset {nul}: a binary file, not JSON lines"
    return None


def _within_limit(block: Block, max_line: int, tally: Tally) -> Iterator[Block]:
    """The block as is, or split around its over-long lines."""
    lengths = block.lengths()
    if lengths.max() <= max_line:
        yield block
        return
    starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    keep_from = 0  # index of the first line of the block being gathered
    for i in np.flatnonzero(lengths > max_line):
        if i > keep_from:
            yield Block(block.first + keep_from, block.data[starts[keep_from]:starts[i]])
        _too_long(tally, block.first + int(i), int(lengths[i]), max_line)
        keep_from = i + 1
    if keep_from < len(block):
        yield Block(block.first + keep_from, block.data[starts[keep_from]:])


def _too_long(tally: Tally, number: int, length: int, max_line: int) -> None:
    tally.add(number, LINE_SIZE, f"the line is {length} bytes, over the limit of {max_line} bytes")
    tally.rows(1, 0)


# ---------------------------------------------------------------------------- lines to rows

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
