"""The inbox folder: drop a JSONL file in, and it is validated like any other submission.

Watched with `watchfiles` (inotify/FSEvents, no polling), subfolders included; files already
there when the service starts are taken too.

When a file counts as complete
- Renamed into the folder (the safe way: write elsewhere or under a hidden / `.part` / `.tmp`
  name, then rename): taken at once when its modification time is already `settle_seconds` old.
- Written in place: taken once its size and modification time have not changed for
  `settle_seconds`. A writer that pauses longer than that mid-file should rename instead.
- Hidden files and folders (`.name`) and `*.part`, `*.tmp`, `*.partial`, `*.crdownload`,
  `*.swp` are never taken.

Options ride in the file name as dot-separated marks, in any order:
- priority: `.priority-<high|normal|low>`, or a first-level subfolder `high/`, `normal/` or
  `low/` (e.g. `inbox/low/big.jsonl`); the mark wins over the folder; default: the
  `default_priority` setting
- level: `.level-<quick|standard|deep>` (default standard)
- schema: `.schema-<name>`, e.g. `puzzles.schema-syllo_v1.jsonl` (default chat_sft_v1; an
  unknown name is rejected like on any other path)
e.g. `math.priority-high.level-deep.jsonl.gz`. The dataset name is what remains without the
marks and the extensions (.jsonl, .json, .ndjson, .txt, .gz). A mark with an unknown value is
part of the name. The content decides gzip (magic bytes), not the extension.

A taken file is first renamed (atomically) to `.processing/<submission_id>--<priority>--<name>`
so it is never taken twice, then handed over: the gatekeeper hard-links (or copies) it into the
artifact store as the submission's original and removes it once the outcome is announced. Files left in
`.processing/` by a crash or a stop are resumed, under the same submission id, at start.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from urllib.parse import quote, unquote

import structlog
from watchfiles import Change, awatch

from libs.common.events import PRIORITIES, Priority, ValidationLevel, new_id
from services.gatekeeper.schemas import DEFAULT_SCHEMA

PROCESSING = ".processing"
_TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp")
_MARK = re.compile(r"(?P<key>priority|level|schema)-(?P<value>[A-Za-z0-9_]+)")
_VALUES = {"priority": PRIORITIES, "level": ("quick", "standard", "deep")}
_EXTENSIONS = {"jsonl", "json", "ndjson", "txt", "gz"}
_CLAIMED = re.compile(r"(?P<sid>[0-9a-f]{32})--(?P<priority>high|normal|low)--(?P<name>.+)")

log = structlog.get_logger("gatekeeper.inbox")


@dataclass(frozen=True)
class InboxFile:
    """A claimed file, ready to be handed over."""

    path: Path  # inside .processing/
    submission_id: str
    priority: Priority
    name: str  # dataset name
    source: str  # its path relative to the inbox, as it was dropped
    level: ValidationLevel = "standard"
    schema: str = DEFAULT_SCHEMA


@dataclass(frozen=True)
class Options:
    """What a dropped file's path says about its submission."""

    priority: Priority
    name: str
    level: ValidationLevel = "standard"
    schema: str = DEFAULT_SCHEMA


Handover = Callable[[InboxFile], Awaitable[None]]


def wanted(relative: Path) -> bool:
    return not any(part.startswith(".") for part in relative.parts) and not relative.name.endswith(_TEMP_SUFFIXES)


def options_of(relative: Path, default_priority: Priority) -> Options:
    """The submission options a dropped file's path names (see the module docstring)."""
    first, *rest = relative.name.split(".")
    marks: dict[str, str] = {}
    kept = [first]
    for part in rest:
        mark = _MARK.fullmatch(part)
        if mark and mark["value"] in _VALUES.get(mark["key"], (mark["value"],)) and mark["key"] not in marks:
            marks[mark["key"]] = mark["value"]
        else:
            kept.append(part)
    while len(kept) > 1 and kept[-1].lower() in _EXTENSIONS:
        kept.pop()
    folder = relative.parts[0] if len(relative.parts) > 1 and relative.parts[0] in PRIORITIES else default_priority
    return Options(
        priority=marks.get("priority", folder),  # type: ignore[arg-type]
        name=".".join(kept), level=marks.get("level", "standard"),  # type: ignore[arg-type]
        schema=marks.get("schema", DEFAULT_SCHEMA),
    )


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time this size and mtime were first seen


class Inbox:
    def __init__(self, root: Path, settle_seconds: float, default_priority: Priority, handover: Handover) -> None:
        self.root = Path(root).resolve()
        self.processing = self.root / PROCESSING
        self.settle_seconds = settle_seconds
        self.default_priority = default_priority
        self.handover = handover
        self.root.mkdir(parents=True, exist_ok=True)
        self.processing.mkdir(exist_ok=True)
        self._pending: dict[Path, _Seen | None] = {}
        self.watching = False

    async def run(self, stop) -> None:
        """Watch until `stop` is set; hand over each complete file."""
        for path in sorted(self.processing.iterdir()):
            await self._resume(path)
        self._pending.update(dict.fromkeys(self._scan(self.root)))
        # Wake at least this often to re-check files that are settling.
        tick_ms = max(50, int(self.settle_seconds * 250))
        self.watching = True
        try:
            async for changes in awatch(
                self.root, stop_event=stop, recursive=True, yield_on_timeout=True, rust_timeout=tick_ms,
                debounce=tick_ms, step=50,
            ):
                for change, raw in changes:
                    path = Path(raw)
                    if change == Change.deleted:
                        self._pending.pop(path, None)
                    elif path.is_dir():
                        # A folder moved in arrives as one event; its files do not.
                        self._pending.update(dict.fromkeys(self._scan(path)))
                    elif self._is_candidate(path):
                        self._pending.setdefault(path, None)
                await self._take_ready()
        finally:
            self.watching = False

    # ------------------------------------------------------------------ internals

    def _is_candidate(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return False
        return wanted(relative)

    def _scan(self, folder: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if self._is_candidate(path):
                    yield path

    def _settled(self, path: Path, now: float) -> bool:
        """Whether `path` is complete (see the module docstring); raises if it is gone."""
        stat = path.stat()
        if not S_ISREG(stat.st_mode):
            raise FileNotFoundError(path)
        seen = self._pending.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self._pending[path] = _Seen(stat.st_size, stat.st_mtime_ns, now)
            # First sight of a file untouched for a while: it was renamed in (or predates us).
            return seen is None and time.time() - stat.st_mtime >= self.settle_seconds
        return now - seen.since >= self.settle_seconds

    async def _take_ready(self) -> None:
        now = time.monotonic()
        for path in list(self._pending):
            try:
                if not self._settled(path, now):
                    continue
            except FileNotFoundError:
                self._pending.pop(path, None)
                continue
            self._pending.pop(path, None)
            relative = path.relative_to(self.root)
            options = options_of(relative, self.default_priority)
            submission_id = new_id()
            # The original path rides in the name (for a resume), cut to stay within NAME_MAX.
            source = quote(relative.as_posix(), safe="")[-150:]
            claimed = self.processing / f"{submission_id}--{options.priority}--{source}"
            try:
                os.replace(path, claimed)
            except FileNotFoundError:
                continue  # taken away meanwhile
            except OSError as exc:
                log.error("cannot claim an inbox file; left where it is", path=str(path), error=repr(exc))
                continue
            await self._hand_over(InboxFile(claimed, submission_id, options.priority, options.name,
                                            relative.as_posix(), options.level, options.schema))

    async def _resume(self, path: Path) -> None:
        match = _CLAIMED.fullmatch(path.name)
        if not match or not path.is_file():
            log.warning("unexpected entry in .processing left alone", path=str(path))
            return
        source = unquote(match["name"])
        options = options_of(Path(source), self.default_priority)
        log.info("resuming a file claimed before a restart", path=str(path))
        await self._hand_over(InboxFile(path, match["sid"], match["priority"], options.name, source,  # type: ignore[arg-type]
                                        options.level, options.schema))

    async def _hand_over(self, item: InboxFile) -> None:
        try:
            await self.handover(item)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the inbox; it stays in .processing
            log.error("inbox file failed; left in .processing for the next start", path=str(item.path), error=repr(exc))
