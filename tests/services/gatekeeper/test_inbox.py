"""The inbox folder without a bus: naming rules, when a file counts as complete, what is picked up."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from services.gatekeeper.inbox import Inbox, InboxFile, Options, options_of, wanted


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
    while not inbox.watching:
        await asyncio.sleep(0.02)
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
        while len(calls) < 1:
            await asyncio.sleep(0.05)
        (tmp_path / "inbox" / "second.jsonl").write_bytes(b"2\n")
        while len(calls) < 2:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert calls[0].path.exists() and calls[0].path.parent.name == ".processing"
