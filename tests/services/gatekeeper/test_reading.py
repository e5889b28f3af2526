"""File checks and line framing: sizes, gzip (and bombs), binary formats, encodings, long lines, bounded memory."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import pytest

from services.gatekeeper.checks import Tally
from services.gatekeeper.reading import CHUNK_BYTES, Block, Limits, read_blocks

GOOD = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def frame(path: Path, limits: Limits = Limits()) -> tuple[Tally, list[tuple[int, bytes]]]:
    tally = Tally(100)
    blocks = read_blocks(path, limits, tally)
    lines = [(block.first + i, line) for block in blocks for i, line in enumerate(block.lines)]
    return tally, lines


def write(tmp_path: Path, data: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def reasons(tally: Tally, check: str) -> list[str]:
    return [f.reason for f in tally.checks[check].findings]


# ---------------------------------------------------------------------------- file checks


def test_lines_are_numbered_across_blocks_and_chunk_boundaries(tmp_path: Path):
    rows = [b'{"n": %d, "pad": "%s"}' % (i, b"x" * (i % 97)) for i in range(5000)]
    data = b"\n".join(rows) + b"\n"
    assert len(data) > 3 * CHUNK_BYTES
    tally, lines = frame(write(tmp_path, data))
    assert [n for n, _ in lines] == list(range(1, 5001)) and [line for _, line in lines] == rows
    assert tally.num_lines == 5000 and not tally.checks


def test_a_last_line_without_newline_and_crlf_lines_are_read(tmp_path: Path):
    tally, lines = frame(write(tmp_path, b"a\r\nb\r\nlast"))
    assert lines == [(1, b"a\r"), (2, b"b\r"), (3, b"last")] and tally.num_lines == 3


def test_file_over_max_file_bytes_is_rejected_unread(tmp_path: Path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:  # sparse: 10 GB that take no disk and would take long to read
        fh.truncate(10 * 1024**3)
    tally, lines = frame(path, Limits(max_file_bytes=1 << 30))
    assert not lines and tally.fatal == [
        f"file_size: the file is {10 * 1024**3} bytes, over the limit of {1 << 30} bytes"]
    tally, lines = frame(write(tmp_path, GOOD * 2), Limits(max_file_bytes=len(GOOD) * 2))
    assert len(lines) == 2 and not tally.fatal


def test_empty_file_and_empty_gzip(tmp_path: Path):
    tally, _ = frame(write(tmp_path, b""))
    assert tally.fatal == ["file_empty: the file is empty"]
    tally, _ = frame(write(tmp_path, gzip.compress(b"")))
    assert tally.fatal == ["file_empty: the gzip file decompresses to nothing"]


def test_gzip_is_recognised_by_its_magic_bytes_whatever_the_name(tmp_path: Path):
    tally, lines = frame(write(tmp_path, gzip.compress(GOOD * 3), name="no-extension.txt"))
    assert [line for _, line in lines] == [GOOD[:-1]] * 3 and not tally.checks


def test_gzip_bomb_stops_at_the_decompressed_limit_in_bounded_memory(tmp_path: Path):
    bomb = write(tmp_path, gzip.compress(GOOD * ((64 << 20) // len(GOOD)), compresslevel=9), name="bomb.jsonl.gz")
    assert bomb.stat().st_size < 512 << 10
    tally = Tally(100)
    tracemalloc.start()
    try:
        lines = sum(len(block) for block in read_blocks(bomb, Limits(max_file_bytes=8 << 20), tally))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines <= (8 << 20) // len(GOOD)
    assert tally.fatal == [f"file_size: decompressed size exceeds the limit of {8 << 20} bytes (max_file_bytes)"]
    assert peak < 4 << 20, peak


def test_corrupt_and_truncated_gzip_are_rejected(tmp_path: Path):
    packed = gzip.compress(GOOD * 1000)
    tally, _ = frame(write(tmp_path, packed[: len(packed) // 2]))
    assert tally.fatal and tally.fatal[0].startswith("gzip: the gzip stream is corrupt")
    corrupt = packed[:20] + bytes(b ^ 0x55 for b in packed[20:60]) + packed[60:]
    tally, _ = frame(write(tmp_path, corrupt))
    assert tally.fatal and tally.fatal[0].startswith("gzip: ")
    tally, _ = frame(write(tmp_path, packed))
    assert not tally.fatal


@pytest.mark.parametrize(("head", "named"), [
    (b"PK\x03\x04rest", "a zip archive"), (b"BZh91AY&SY", "bzip2-compressed"), (b"\xfd7zXZ\x00\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd\x00", "zstd-compressed"), (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"%PDF-1.7\n", "a PDF document"),
    (b"\x7fELF\x02\x01", "an executable"), (b'{"a": 1}\n\x00\x01\x02', "NUL byte at offset 9"),
])
def test_binary_files_are_rejected_naming_what_they_are(tmp_path: Path, head: bytes, named: str):
    tally, lines = frame(write(tmp_path, head + os.urandom(64)))
    assert not lines and len(tally.fatal) == 1 and tally.fatal[0].startswith("binary: ") and named in tally.fatal[0]


@pytest.mark.parametrize(("codec", "name"), [("utf-16", "UTF-16"), ("utf-32", "UTF-32"), ("utf-16-be", None)])
def test_utf16_and_utf32_are_rejected(tmp_path: Path, codec: str, name: str | None):
    text = GOOD.decode().encode(codec)
    if name is None:  # no BOM: caught as binary by its NUL bytes
        text = text.lstrip(b"\xfe\xff")
    tally, _ = frame(write(tmp_path, text))
    check = "encoding" if name else "binary"
    assert tally.fatal and tally.fatal[0].startswith(f"{check}: "), tally.fatal
    if name:
        assert f"the file is {name}" in tally.fatal[0]


def test_utf8_bom_is_stripped_with_a_warning(tmp_path: Path):
    tally, lines = frame(write(tmp_path, b"\xef\xbb\xbf" + GOOD))
    assert lines == [(1, GOOD[:-1])] and tally.counts == {"bom": 1} and tally.num_warnings == 1 and not tally.fatal
    tally, _ = frame(write(tmp_path, GOOD))
    assert not tally.checks


# ---------------------------------------------------------------------------- long lines


@pytest.mark.parametrize("max_line", [50, 1000, CHUNK_BYTES + 10, 3 * CHUNK_BYTES])
def test_over_long_lines_are_skipped_and_the_lines_around_them_kept(tmp_path: Path, max_line: int):
    long_line = b"x" * (max_line + 1)
    at_limit = b"y" * max_line
    data = b"a\n" + long_line + b"\n" + at_limit + b"\nb\n" + long_line * 3 + b"\nc\n" + long_line
    tally, lines = frame(write(tmp_path, data), Limits(max_line_bytes=max_line))
    assert lines == [(1, b"a"), (3, at_limit), (4, b"b"), (6, b"c")]
    findings = tally.checks["line_size"].findings
    assert [(f.line, f.reason) for f in findings] == [
        (2, f"the line is {max_line + 1} bytes, over the limit of {max_line} bytes"),
        (5, f"the line is {3 * (max_line + 1)} bytes, over the limit of {max_line} bytes"),
        (7, f"the line is {max_line + 1} bytes, over the limit of {max_line} bytes"),
    ]
    assert tally.num_rows == 3 and tally.num_rows_valid == 0 and tally.num_lines == 7


def test_a_100_mb_line_is_skipped_in_bounded_memory(tmp_path: Path):
    path = tmp_path / "huge-line.jsonl"
    with open(path, "wb") as fh:
        fh.write(GOOD)
        piece = b'{"messages": "' + b"z" * (1 << 20)
        for _ in range(100):
            fh.write(piece)
        fh.write(b'"}\n' + GOOD)
    tracemalloc.start()
    try:
        tally, lines = frame(path)  # the default limit: 1 MiB a line
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [n for n, _ in lines] == [1, 3]
    [finding] = tally.checks["line_size"].findings
    assert finding.line == 2 and f"the line is {100 * len(piece) + 2} bytes" in finding.reason
    assert peak < 10 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_a_gzip_cut_short_after_many_good_lines_still_rejects_the_file(tmp_path: Path):
    packed = gzip.compress(GOOD * 50_000)
    tally, lines = frame(write(tmp_path, packed[: int(len(packed) * 0.9)]))
    assert len(lines) > 1000  # read up to the cut
    assert [reason.split(":")[0] for reason in tally.fatal] == ["gzip"]


@pytest.mark.parametrize(("data", "braced"), [
    (b'{"a":1}\n{"b":2}\n', True),
    (b'{"a":1}\n{"b":2}', True),  # no newline after the last line
    (b'{"a":1}', True),
    (b'{"a":1} {"b":2}\n', True),  # two values on a line: whole values still; the count tells
    (b'{"a":\n{"b":1}}\n', False),  # a value spanning two lines
    (b'{"a":1}\n\n{"b":2}\n', False),  # a blank line
    (b' {"a":1}\n', False),
    (b'{"a":1} \n', False),
    (b'{"a":1}\r\n{"b":2}\r\n', False),  # CRLF lines go line by line
    (b'[1]\n', False),
    (b'\n', False),
])
def test_braces_every_line_tells_when_no_value_can_span_lines(data: bytes, braced: bool):
    assert Block(1, data).braces_every_line() is braced
