"""The artifact store: datasets, reports and checkpoints, addressed by URI plus sha256.

The default store is a local directory (`<data_dir>/artifacts`); URIs are `file://` paths
inside it. Anything that resolves outside the store root is refused, so a URI that arrives in
an event can never make a service read or write elsewhere. Writes go to a temporary name and
are renamed into place: a reader never sees half a file.

When hosts share no disk (`FLYWHEEL_ARTIFACT_TRANSPORT=nats`) each host keeps its own directory
and the bytes travel through the JetStream object store (libs.common.object_transport). URIs
are then `nats-obj://artifacts/<key>`, the key being the artifact's path inside any host's
store: the same URI names the writer's file and every reader's cached copy. The writer
`share`s an artifact before an event names it (the bus does it for every event that declares
artifacts), a reader `fetch`es it into its own directory, checked against the event's sha256.
A directory (a checkpoint) is one object per file plus a manifest object under the key itself
that lists every file with its sha256; it is fetched file by file into a hidden staging
directory, so a cut-short fetch keeps the files it finished, and renamed into place whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal
from urllib.parse import quote, unquote, urlparse

import msgspec

if TYPE_CHECKING:  # object_transport imports this module
    from libs.common.object_transport import ObjectTransport

_CHUNK = 1 << 20
Transport = Literal["local", "nats"]
SHARED_SCHEME = "nats-obj"
# The object store bucket's description of a directory manifest (`nats object ls` shows it).
DIRECTORY_MANIFEST = "flywheel directory manifest"
# Hidden folders of the store: resume records of transfers, and fetches in progress.
TRANSFERS_DIR = ".transfers"


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


class DirectoryManifest(msgspec.Struct, frozen=True):
    """A directory artifact in the object store: its files, each stored as `<key>/<path>`."""

    class File(msgspec.Struct, frozen=True):
        path: str
        sha256: str
        size: int

    sha256: str
    files: tuple[File, ...]


class ArtifactStore:
    def __init__(self, root: Path, *, transport: Transport = "local") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.transport = transport
        # The object store, once the service is connected (`attach`); only with transport "nats".
        self.objects: ObjectTransport | None = None
        self._fetching: dict[str, asyncio.Lock] = {}

    def attach(self, objects: ObjectTransport) -> None:
        """Move artifacts through `objects` (the runtime calls this once NATS is connected)."""
        self.objects = objects

    @property
    def bucket(self) -> str:
        from libs.common.object_transport import BUCKET

        return self.objects.bucket if self.objects else BUCKET

    # ------------------------------------------------------------------ addressing

    def uri_for(self, path: Path) -> str:
        path = self._inside(Path(path))
        if self.transport == "local":
            return path.as_uri()
        return f"{SHARED_SCHEME}://{self.bucket}/{quote(self.key_for(path))}"

    def key_for(self, path: Path) -> str:
        """The artifact's key: its path inside the store, the same on every host."""
        return self._inside(Path(path)).relative_to(self.root).as_posix()

    def path_for(self, uri: str) -> Path:
        """The local path of `uri` (for a shared URI: where this host keeps its copy); refuses
        anything outside the store."""
        parsed = urlparse(uri)
        if parsed.scheme == SHARED_SCHEME:
            key = unquote(parsed.path).lstrip("/")
            if not key or parsed.netloc != self.bucket:
                raise ArtifactError(f"unsupported artifact URI {uri!r}: expected {SHARED_SCHEME}://{self.bucket}/<key>")
            return self._inside(self.root / key)
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
        return Artifact(uri=self.uri_for(target), sha256=sha256, size=size)

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
        return Artifact(uri=self.uri_for(path), sha256=sha256_dir(path), size=size)

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

    # ------------------------------------------------------------------ across hosts
    # What a service awaits around an artifact another host may have written or may read. On
    # one machine (the default) these are the local operations; with the NATS object store as
    # transport they also move the bytes (see `fetch`, `share`, `discard`).

    @staticmethod
    def is_shared(uri: str) -> bool:
        """Whether `uri` names an artifact in the object store (hosts without a shared disk)."""
        return urlparse(uri).scheme == SHARED_SCHEME

    def _shared(self, uri: str) -> ObjectTransport | None:
        """The object store `uri` travels through; None for a local artifact."""
        if urlparse(uri).scheme != SHARED_SCHEME:
            return None
        if self.objects is None:
            raise ArtifactError(f"{uri} is in the NATS object store, and this service does not use it: set "
                                "FLYWHEEL_ARTIFACT_TRANSPORT=nats on every host of a deployment without a shared disk")
        return self.objects

    async def fetch(self, uri: str, sha256: str) -> Path:
        """The local path of the artifact `uri`, its content checked against `sha256`.

        A shared artifact this host does not hold (or holds with other content) is fetched from
        the object store first; concurrent fetches of one artifact in a process wait for one.
        """
        path = self.path_for(uri)
        objects = self._shared(uri) if not path.exists() else None
        if objects is None:
            try:
                return await asyncio.to_thread(self.verify, uri, sha256)
            except ArtifactError:
                if urlparse(uri).scheme != SHARED_SCHEME:
                    raise
                objects = self._shared(uri)
        async with self._fetching.setdefault(uri, asyncio.Lock()):
            # Another process on this host (the evaluator and inference share a data directory)
            # may be fetching it too: one at a time, through a lock file beside it.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_name(f".fetch-{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                if path.exists():  # fetched meanwhile, or a stale copy to replace
                    with contextlib.suppress(ArtifactError):
                        return await asyncio.to_thread(self.verify, uri, sha256)
                await self._download(objects, self.key_for(path), path, sha256)
                return await asyncio.to_thread(self.verify, uri, sha256)
            finally:
                os.close(fd)  # releases the lock

    async def _download(self, objects: ObjectTransport, key: str, path: Path, sha256: str) -> None:
        stored = await objects.stat(key)
        if stored is None:
            raise ArtifactError(f"artifact {key!r} is neither on this host nor in the object store {objects.bucket!r}")
        if stored.description != DIRECTORY_MANIFEST:
            await objects.get_file(key, path, sha256=sha256)
            return
        manifest = msgspec.json.decode(await objects.read_small(key), type=DirectoryManifest)
        if manifest.sha256 != sha256:
            raise ArtifactError(f"artifact {key!r} in the object store has sha256 {manifest.sha256}, not {sha256}")
        staging = path.with_name(f".fetch-{path.name}")
        for file in manifest.files:
            target = self._inside(staging / file.path)
            if target.exists() and await asyncio.to_thread(sha256_file, target) == file.sha256:
                continue  # fetched by an attempt that was cut short
            await objects.get_file(f"{key}/{file.path}", target, sha256=file.sha256)
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path)
        os.replace(staging, path)

    async def share(self, uri: str, sha256: str) -> None:
        """Make a finished artifact readable by every host (before an event names it).

        A local artifact needs nothing. A shared one this host holds is put into the object
        store unless it is there already with this content; one this host does not hold must
        be there already (someone else shared it).
        """
        objects = self._shared(uri)
        if objects is None:
            return
        path = self.path_for(uri)
        key = self.key_for(path)
        stored = await objects.stat(key)
        if stored is not None and (stored.sha256 == sha256 or (
                stored.description == DIRECTORY_MANIFEST and await self._manifest_sha256(objects, key) == sha256)):
            return
        if not path.exists():
            raise ArtifactError(f"cannot share {uri}: this host does not hold it and the object store does not either")
        if not path.is_dir():
            await objects.put_file(path, key, sha256=sha256)
            return
        files = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stored_file = await objects.put_file(file, f"{key}/{file.relative_to(path).as_posix()}")
            files.append(DirectoryManifest.File(file.relative_to(path).as_posix(), stored_file.sha256, stored_file.size))
        # Last: a manifest present means every file it lists is stored.
        await objects.put_bytes(msgspec.json.encode(DirectoryManifest(sha256=sha256, files=tuple(files))), key,
                                description=DIRECTORY_MANIFEST)

    async def _manifest_sha256(self, objects: ObjectTransport, key: str) -> str:
        return msgspec.json.decode(await objects.read_small(key), type=DirectoryManifest).sha256

    async def discard(self, uri: str) -> None:
        """Remove an artifact everywhere it is stored: this host's copy and the object store's."""
        path = self.path_for(uri)
        objects = self._shared(uri)
        if objects is not None:
            key = self.key_for(path)
            stored = await objects.stat(key)
            if stored is not None and stored.description == DIRECTORY_MANIFEST:
                manifest = msgspec.json.decode(await objects.read_small(key), type=DirectoryManifest)
                await objects.delete(key)  # first: a half-deleted directory must not look whole
                for file in manifest.files:
                    await objects.delete(f"{key}/{file.path}")
            elif stored is not None:
                await objects.delete(key)
        await asyncio.to_thread(self.remove, uri)

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
