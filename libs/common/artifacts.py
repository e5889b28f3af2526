"""The artifact store: datasets, reports and checkpoints, addressed by URI plus sha256.

The default store is a local directory (`<data_dir>/artifacts`); URIs are `file://` paths
inside it. Anything that resolves outside the store root is refused, so a URI that arrives in
an event can never make a service read or write elsewhere. Writes go to a temporary name and
are renamed into place: a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import msgspec

_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """A URI is malformed, outside the store, missing, or its content does not match its hash."""


class Artifact(msgspec.Struct, frozen=True):
    uri: str
    sha256: str
    size: int


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file handle whose content replaces `path` only when the block ends without error.

    It goes to a temporary file beside `path`, is fsynced and renamed into place: a reader
    sees the old file or the whole new one, never half, even after a crash; a failure leaves
    no temporary file behind. Every file Flywheel writes in place goes through here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write `chunks` to `path` through `atomic_file`; (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    with atomic_file(path) as fh:
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """A lowercase sha256 hex digest: the form of every content hash and dataset id here."""
    return bool(_SHA256.fullmatch(text))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: Path) -> str:
    """A directory's hash: sha256 over sorted (relative path, file sha256) lines."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ addressing

    def uri_for(self, path: Path) -> str:
        return self._inside(Path(path)).as_uri()

    def path_for(self, uri: str) -> Path:
        """The local path of `uri`; refuses anything outside the store."""
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ArtifactError(f"unsupported artifact URI {uri!r}: expected file:// inside {self.root}")
        return self._inside(Path(unquote(parsed.path)))

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ArtifactError(f"{path} is outside the artifact store {self.root}")
        return resolved

    def location(self, *parts: str) -> Path:
        """A path inside the store built from untrusted name parts (no traversal possible)."""
        clean = [p for p in (_safe_part(part) for part in parts) if p]
        return self._inside(self.root.joinpath(*clean))

    # ------------------------------------------------------------------ writing

    def write_lines(self, lines: Iterable[bytes], *parts: str) -> Artifact:
        """Write `lines` (each ending in newline) atomically, hashing as it goes."""
        target = self.location(*parts)
        sha256, size = write_atomically(target, lines)
        return Artifact(uri=target.as_uri(), sha256=sha256, size=size)

    def write_bytes(self, data: bytes, *parts: str) -> Artifact:
        return self.write_lines([data], *parts)

    def import_file(self, source: Path, *parts: str) -> Artifact:
        """Copy an outside file in (streamed), atomically."""

        def chunks() -> Iterable[bytes]:
            with open(source, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk

        return self.write_lines(chunks(), *parts)

    def describe_dir(self, path: Path) -> Artifact:
        """URI, hash and size of a finished directory artifact (a checkpoint)."""
        path = self._inside(Path(path))
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return Artifact(uri=path.as_uri(), sha256=sha256_dir(path), size=size)

    # ------------------------------------------------------------------ reading

    def verify(self, uri: str, sha256: str) -> Path:
        """The local path of `uri` after checking its content hash (file or directory)."""
        path = self.path_for(uri)
        if not path.exists():
            raise ArtifactError(f"artifact {uri} does not exist")
        actual = sha256_dir(path) if path.is_dir() else sha256_file(path)
        if actual != sha256:
            raise ArtifactError(f"artifact {uri}: sha256 {actual} does not match the announced {sha256}")
        return path

    def remove(self, uri: str) -> None:
        path = self.path_for(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _safe_part(part: str) -> str:
    """One path component from an untrusted name: no separators, no dot-dot, no hidden files."""
    name = part.replace("\\", "/").split("/")[-1] if "/" in part or "\\" in part else part
    name = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name).lstrip(".")
    return name[:200]
