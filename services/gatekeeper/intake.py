"""The ways in: what a submission is, and how its bytes arrive over HTTP and through the inbox folder.

Every way in makes a `Submission` (its id, name, channel, schema, data profile, level and priority) and hands
its bytes to the pipeline (pipeline.py), so all of them are validated alike:
- NATS `dataset.submitted`, with inline rows or a uri (`Gatekeeper.submit_event`); the
  submission id is the event id made path-safe, so a redelivery is recognised;
- HTTP `POST /datasets` and `POST /datasets/upload` (api.py), streamed to disk here;
- the inbox folder, watched here.

HTTP uploads reach the disk streamed, capped, never whole in memory:
- A raw body (`POST /datasets`) is written chunk by chunk as it arrives.
- A multipart form (`POST /datasets/upload`) is parsed as it arrives (python-multipart's
  streaming parser): the bytes of the part named `file` go straight to the file, other parts
  are ignored (and capped), so nothing is spooled to a temporary file first the way a
  framework's form parsing does.
Either way, the moment more than `max_bytes` of data has come, the upload is cut off: the
partial file is deleted and the client gets 413 — bounded memory and bounded disk whatever the
client sends. The file name a client gives is reduced to its last path component and used
for the dataset's name and extension only; it never chooses a path on disk.

The inbox folder: drop a JSONL file in, and it is validated like any other submission.
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
- data profile: `.profile-<name>`, e.g. `math.profile-emoji_think.jsonl` (default none; an
  unknown name is rejected like on any other path; libs/common/profiles.py)
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
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from stat import S_ISREG
from urllib.parse import quote, unquote

import msgspec
import structlog
from python_multipart.multipart import MultipartParser, parse_options_header
from watchfiles import Change, awatch

from libs.common.events import PRIORITIES, Priority, ValidationLevel, derived_id, new_id
from libs.common.profiles import DEFAULT_PROFILE
from services.gatekeeper.schemas import DEFAULT_SCHEMA

# ---------------------------------------------------------------------------- the submission

_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Submission(msgspec.Struct, frozen=True, kw_only=True):
    submission_id: str
    name: str
    channel: str
    # Where the bytes come from: "inline", a uri, an uploaded or inbox file name.
    source: str
    schema: str = DEFAULT_SCHEMA
    priority: Priority = "normal"
    level: ValidationLevel = "standard"
    submitted_by: str = "anonymous"
    # The data profile the trainer is to apply (libs.common.profiles); checked by the pipeline.
    profile: str = DEFAULT_PROFILE


def submission_id_for(event_id: str) -> str:
    """A NATS submission's id is its event id (so redeliveries match), made path-safe."""
    return event_id if _SUBMISSION_ID.fullmatch(event_id) else derived_id("gatekeeper", event_id)


def is_submission_id(text: str) -> bool:
    return bool(_SUBMISSION_ID.fullmatch(text))


# ---------------------------------------------------------------------------- HTTP uploads

UPLOAD_FIELD = "file"
# Form fields other than the file (and multipart headers) are small; this bounds them.
_OVERHEAD_BYTES = 64 * 1024


class UploadRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def too_large(max_bytes: int) -> UploadRefused:
    return UploadRefused(413, f"the upload is over the limit of {max_bytes} bytes (max_file_bytes); "
                              "split it or raise the limit")


def safe_filename(name: str) -> str:
    """The last component of a client's file name, whichever separator it used ('' if none)."""
    name = PureWindowsPath(PurePosixPath(name.replace("\0", "")).name).name
    return "" if name in (".", "..") else name


async def receive_body(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Path:
    """Stream a raw request body into a new file in `folder`."""
    with _UploadFile(folder, max_bytes) as upload:
        async for chunk in chunks:
            upload.write(chunk)
        return upload.done()


async def receive_multipart(chunks: AsyncIterator[bytes], content_type: str, folder: Path,
                            max_bytes: int) -> tuple[Path, str]:
    """Stream the `file` part of a multipart body into a new file in `folder`; (path, file name)."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadRefused(400, "expected a multipart/form-data body with a boundary")
    with _UploadFile(folder, max_bytes) as upload:
        part = _Part()
        state = {"file_parts": 0, "filename": ""}

        def on_header_field(data: bytes, start: int, end: int) -> None:
            part.field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            part.value += data[start:end]

        def on_header_end() -> None:
            if part.field.lower() == b"content-disposition":
                _, options = parse_options_header(part.value)
                part.name = options.get(b"name", b"").decode("utf-8", "replace")
                part.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            part.field, part.value = b"", b""

        def on_headers_finished() -> None:
            part.is_file = part.name == UPLOAD_FIELD and state["file_parts"] == 0
            if part.is_file:
                state["file_parts"] += 1
                state["filename"] = safe_filename(part.filename)

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if part.is_file:
                upload.write(data[start:end])
            else:
                part.other_bytes += end - start
                if part.other_bytes > _OVERHEAD_BYTES:
                    raise UploadRefused(413, "a form field other than `file` is too large")

        def on_part_end() -> None:
            part.reset()

        parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
        }, max_size=max_bytes + _OVERHEAD_BYTES)
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except UploadRefused:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed form is the client's problem
                raise UploadRefused(400, f"malformed multipart body: {exc}") from exc
        parser.finalize()
        if not state["file_parts"]:
            raise UploadRefused(400, f"no `{UPLOAD_FIELD}` part in the form")
        return upload.done(), state["filename"]


class _Part:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.field = b""
        self.value = b""
        self.name = ""
        self.filename = ""
        self.is_file = False
        self.other_bytes = 0


class _UploadFile:
    """A new file in `folder` that refuses more than `max_bytes` and vanishes unless done()."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".part")
        self.path = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._max = max_bytes
        self._size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._max:
            raise too_large(self._max)
        self._fh.write(data)

    def done(self) -> Path:
        self._fh.close()
        self._done = True
        return self.path

    def __enter__(self) -> _UploadFile:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
        if not self._done:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the inbox folder

PROCESSING = ".processing"
_TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp")
_MARK = re.compile(r"(?P<key>priority|level|schema|profile)-(?P<value>[A-Za-z0-9_]+)")
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
    profile: str = DEFAULT_PROFILE


@dataclass(frozen=True)
class Options:
    """What a dropped file's path says about its submission."""

    priority: Priority
    name: str
    level: ValidationLevel = "standard"
    schema: str = DEFAULT_SCHEMA
    profile: str = DEFAULT_PROFILE


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
        schema=marks.get("schema", DEFAULT_SCHEMA), profile=marks.get("profile", DEFAULT_PROFILE),
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
                                            relative.as_posix(), options.level, options.schema, options.profile))

    async def _resume(self, path: Path) -> None:
        match = _CLAIMED.fullmatch(path.name)
        if not match or not path.is_file():
            log.warning("unexpected entry in .processing left alone", path=str(path))
            return
        source = unquote(match["name"])
        options = options_of(Path(source), self.default_priority)
        log.info("resuming a file claimed before a restart", path=str(path))
        await self._hand_over(InboxFile(path, match["sid"], match["priority"], options.name, source,  # type: ignore[arg-type]
                                        options.level, options.schema, options.profile))

    async def _hand_over(self, item: InboxFile) -> None:
        try:
            await self.handover(item)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the inbox; it stays in .processing
            log.error("inbox file failed; left in .processing for the next start", path=str(item.path), error=repr(exc))
