"""The ways in without a bus: the inbox folder and HTTP uploads.

The inbox: naming rules, when a file counts as complete, what is picked up. HTTP uploads reach
the disk streamed and capped: raw bodies, multipart forms, hostile file names.
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from services.gatekeeper.intake import (
    Inbox,
    InboxFile,
    Options,
    UploadRefused,
    options_of,
    receive_body,
    receive_multipart,
    safe_filename,
    wanted,
)
from tests.conftest import wait_for

# ---------------------------------------------------------------------------- the inbox folder


@pytest.mark.parametrize(("relative", "priority", "name", "level", "schema"), [
    ("math.jsonl", "normal", "math", "standard", "chat_sft_v1"),
    ("math.priority-high.jsonl", "high", "math", "standard", "chat_sft_v1"),
    ("math.priority-low", "low", "math", "standard", "chat_sft_v1"),
    ("high/math.jsonl", "high", "math", "standard", "chat_sft_v1"),
    ("low/sub/math.jsonl", "low", "math", "standard", "chat_sft_v1"),
    ("high/math.priority-low.jsonl", "low", "math", "standard", "chat_sft_v1"),  # the file name wins
    ("urgent/math.jsonl", "normal", "math", "standard", "chat_sft_v1"),
    ("a.b.jsonl", "normal", "a.b", "standard", "chat_sft_v1"),
    ("math.level-deep.priority-high.jsonl.gz", "high", "math", "deep", "chat_sft_v1"),
    ("words.schema-syllo_v1.level-quick.jsonl", "normal", "words", "quick", "syllo_v1"),
    ("notes.schema-completion_v1.txt", "normal", "notes", "standard", "completion_v1"),
    ("x.level-ultra.jsonl", "normal", "x.level-ultra", "standard", "chat_sft_v1"),  # unknown value: part of the name
    ("x.schema-nope_v9.jsonl", "normal", "x", "standard", "nope_v9"),  # rejected later, like on any path
])
def test_options_from_the_path(relative, priority, name, level, schema):
    assert options_of(Path(relative), "normal") == Options(priority=priority, name=name, level=level, schema=schema)


@pytest.mark.parametrize(("relative", "name", "profile"), [
    ("math.jsonl", "math", "none"),
    ("math.profile-emoji_think.jsonl", "math", "emoji_think"),
    ("high/math.level-deep.profile-regime3.priority-low.jsonl.gz", "math", "regime3"),
    ("math.profile-nope.jsonl", "math", "nope"),  # rejected later, like on any path
    ("math.profile-.jsonl", "math.profile-", "none"),  # no value: part of the name
])
def test_a_data_profile_from_the_file_name(relative, name, profile):
    options = options_of(Path(relative), "normal")
    assert (options.name, options.profile) == (name, profile)


async def test_a_claimed_file_keeps_its_data_profile_across_a_restart(tmp_path: Path):
    root = tmp_path / "inbox"
    (root / ".processing").mkdir(parents=True)
    (root / ".processing" / f"{'e' * 32}--low--math.profile-emoji_think.jsonl").write_bytes(b"resumed\n")
    recorder = Recorder()
    inbox = Inbox(root, settle_seconds=0.5, default_priority="normal", handover=recorder)
    stop, task = await running(inbox)
    try:
        await recorder.wait_for(1)
    finally:
        stop.set()
        await task
    [(item, _, _)] = recorder.items
    assert (item.submission_id, item.name, item.priority, item.profile) == ("e" * 32, "math", "low", "emoji_think")


@pytest.mark.parametrize(("relative", "taken"), [
    ("d.jsonl", True), ("sub/d.txt", True), (".d.jsonl", False), ("d.jsonl.part", False), ("d.tmp", False),
    (".processing/x.jsonl", False), ("sub/.hidden/d.jsonl", False), ("d.jsonl.swp", False),
])
def test_hidden_and_temporary_files_are_never_taken(relative, taken):
    assert wanted(Path(relative)) is taken


class Recorder:
    """A handover that records each file's content at the moment it is handed over."""

    def __init__(self) -> None:
        self.items: list[tuple[InboxFile, bytes, float]] = []
        self.changed = asyncio.Event()

    async def __call__(self, item: InboxFile) -> None:
        self.items.append((item, item.path.read_bytes(), time.monotonic()))
        item.path.unlink()
        self.changed.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async def until() -> None:
            while len(self.items) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)


async def running(inbox: Inbox):
    stop = asyncio.Event()
    task = asyncio.create_task(inbox.run(stop))
    await wait_for(lambda: inbox.watching, "the inbox to watch its folder", interval=0.02)
    return stop, task


async def test_a_file_written_in_two_chunks_is_taken_only_when_complete(tmp_path: Path):
    recorder = Recorder()
    inbox = Inbox(tmp_path / "inbox", settle_seconds=1.0, default_priority="normal", handover=recorder)
    stop, task = await running(inbox)
    try:
        with open(tmp_path / "inbox" / "slow.jsonl", "wb") as fh:
            fh.write(b'{"part": 1}\n')
            fh.flush()
            await asyncio.sleep(0.7)  # a pause shorter than settle_seconds
            assert not recorder.items
            fh.write(b'{"part": 2}\n')
        written = time.monotonic()
        await recorder.wait_for(1)
        [(item, content, seen)] = recorder.items
        assert content == b'{"part": 1}\n{"part": 2}\n'
        assert seen - written >= 0.9  # waited for the size to settle
        assert (item.name, item.priority, item.source) == ("slow", "normal", "slow.jsonl")
        assert item.path.parent.name == ".processing"
    finally:
        stop.set()
        await task


async def test_a_file_renamed_in_is_taken_without_waiting(tmp_path: Path):
    recorder = Recorder()
    inbox = Inbox(tmp_path / "inbox", settle_seconds=3.0, default_priority="normal", handover=recorder)
    stop, task = await running(inbox)
    try:
        staged = tmp_path / "ready.jsonl"
        staged.write_bytes(b"{}\n")
        os.utime(staged, (time.time() - 60, time.time() - 60))
        (tmp_path / "inbox" / "high").mkdir()
        (tmp_path / "inbox" / ".hidden.part").write_bytes(b"ignored")
        renamed = time.monotonic()
        staged.rename(tmp_path / "inbox" / "high" / "ready.jsonl")
        await recorder.wait_for(1)
        [(item, _, seen)] = recorder.items
        assert seen - renamed < 2.5 and item.priority == "high"
    finally:
        stop.set()
        await task
    assert (tmp_path / "inbox" / ".hidden.part").exists()


async def test_files_present_at_start_and_claimed_before_a_crash_are_taken(tmp_path: Path):
    root = tmp_path / "inbox"
    (root / "low" / "deeper").mkdir(parents=True)
    (root / ".processing").mkdir()
    for path in (root / "a.priority-high.jsonl", root / "low" / "deeper" / "b.jsonl", root / "c.part"):
        path.write_bytes(b"x\n")
        os.utime(path, (time.time() - 60, time.time() - 60))
    claimed = root / ".processing" / f"{'f' * 32}--high--sub%2Fd.level-deep.schema-syllo_v1.jsonl"
    claimed.write_bytes(b"resumed\n")
    recorder = Recorder()
    inbox = Inbox(root, settle_seconds=0.5, default_priority="normal", handover=recorder)
    stop, task = await running(inbox)
    try:
        await recorder.wait_for(3)
    finally:
        stop.set()
        await task
    taken = {(item.source, item.priority, content) for item, content, _ in recorder.items}
    assert taken == {("sub/d.level-deep.schema-syllo_v1.jsonl", "high", b"resumed\n"),
                     ("a.priority-high.jsonl", "high", b"x\n"), ("low/deeper/b.jsonl", "low", b"x\n")}
    resumed = recorder.items[0][0]
    assert resumed.submission_id == "f" * 32 and (resumed.name, resumed.level, resumed.schema) == ("d", "deep", "syllo_v1")
    assert (root / "c.part").exists()


async def test_a_folder_moved_in_is_scanned(tmp_path: Path):
    recorder = Recorder()
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0.5, default_priority="low", handover=recorder)
    stop, task = await running(inbox)
    try:
        batch = tmp_path / "batch"
        batch.mkdir()
        for name in ("one.jsonl", "two.jsonl"):
            (batch / name).write_bytes(b"{}\n")
        batch.rename(tmp_path / "inbox" / "batch")
        await recorder.wait_for(2)
    finally:
        stop.set()
        await task
    assert sorted(item.source for item, _, _ in recorder.items) == ["batch/one.jsonl", "batch/two.jsonl"]
    assert {item.priority for item, _, _ in recorder.items} == {"low"}


async def test_a_failing_handover_leaves_the_file_claimed_and_the_inbox_running(tmp_path: Path):
    calls: list[InboxFile] = []

    async def failing(item: InboxFile) -> None:
        calls.append(item)
        if len(calls) == 1:
            raise RuntimeError("disk full")

    inbox = Inbox(tmp_path / "inbox", settle_seconds=0.3, default_priority="normal", handover=failing)
    stop, task = await running(inbox)
    try:
        (tmp_path / "inbox" / "first.jsonl").write_bytes(b"1\n")
        await wait_for(lambda: len(calls) >= 1, "the first handover")
        (tmp_path / "inbox" / "second.jsonl").write_bytes(b"2\n")
        await wait_for(lambda: len(calls) >= 2, "the second handover, after the first failed")
    finally:
        stop.set()
        await task
    assert calls[0].path.exists() and calls[0].path.parent.name == ".processing"


# ---------------------------------------------------------------------------- HTTP uploads


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
