"""HTTP uploads reach the disk streamed and capped: raw bodies, multipart forms, hostile file names."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import httpx
import pytest

from services.gatekeeper.uploads import UploadRefused, receive_body, receive_multipart, safe_filename


async def chunked(data: bytes, size: int = 1000):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def multipart(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


async def test_a_raw_body_is_written_as_it_arrives(tmp_path: Path):
    path = await receive_body(chunked(b"x" * 10_000), tmp_path, max_bytes=10_000)
    assert path.read_bytes() == b"x" * 10_000 and path.parent == tmp_path


async def test_a_raw_body_over_the_limit_is_cut_off_and_nothing_is_left(tmp_path: Path):
    with pytest.raises(UploadRefused) as refused:
        await receive_body(chunked(b"x" * 10_001), tmp_path, max_bytes=10_000)
    assert refused.value.status == 413 and "max_file_bytes" in str(refused.value)
    assert not list(tmp_path.iterdir())


async def test_the_file_part_of_a_form_is_streamed_and_other_fields_ignored(tmp_path: Path):
    body, content_type = multipart({"file": ("rows.jsonl", b'{"a": 1}\n' * 500)}, {"note": "hello"})
    path, filename = await receive_multipart(chunked(body, 333), content_type, tmp_path, max_bytes=1 << 20)
    assert path.read_bytes() == b'{"a": 1}\n' * 500 and filename == "rows.jsonl"


async def test_a_form_over_the_limit_is_cut_off_in_bounded_memory(tmp_path: Path):
    big = b"y" * (20 << 20)
    body, content_type = multipart({"file": ("big.jsonl", big)})
    tracemalloc.start()
    try:
        with pytest.raises(UploadRefused) as refused:
            await receive_multipart(chunked(body, 64 << 10), content_type, tmp_path, max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and not list(tmp_path.iterdir())
    assert peak < 4 << 20, peak  # the test's own 20 MB body was allocated before tracing


@pytest.mark.parametrize(("given", "kept"), [
    ("../../etc/passwd", "passwd"), ("..\\..\\windows\\system.ini", "system.ini"), ("/abs/rows.jsonl", "rows.jsonl"),
    ("..", ""), ("rows\0.jsonl", "rows.jsonl"), ("C:\\data\\rows.jsonl", "rows.jsonl"), ("plain.jsonl", "plain.jsonl"),
])
def test_client_file_names_are_reduced_to_their_last_component(given: str, kept: str):
    assert safe_filename(given) == kept


async def test_a_form_without_a_file_part_or_not_multipart_is_refused(tmp_path: Path):
    body, content_type = multipart({"other": ("x.jsonl", b"1")})
    with pytest.raises(UploadRefused) as refused:
        await receive_multipart(chunked(body), content_type, tmp_path, max_bytes=1000)
    assert refused.value.status == 400 and "no `file` part" in str(refused.value)
    with pytest.raises(UploadRefused):
        await receive_multipart(chunked(b"{}"), "application/json", tmp_path, max_bytes=1000)
    assert not list(tmp_path.iterdir())
