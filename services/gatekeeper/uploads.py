"""How an HTTP upload reaches the disk: streamed, capped, never whole in memory.

- A raw body (`POST /datasets`) is written chunk by chunk as it arrives.
- A multipart form (`POST /datasets/upload`) is parsed as it arrives (python-multipart's
  streaming parser): the bytes of the part named `file` go straight to the file, other parts
  are ignored (and capped), so nothing is spooled to a temporary file first the way a
  framework's form parsing does.
Either way, the moment more than `max_bytes` of data has come, the upload is cut off: the
partial file is deleted and the client gets 413 — bounded memory and bounded disk whatever the
client sends. The file name a client gives is reduced to its last path component and used
for the dataset's name and extension only; it never chooses a path on disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "file"
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
            part.is_file = part.name == FIELD and state["file_parts"] == 0
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
            raise UploadRefused(400, f"no `{FIELD}` part in the form")
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
