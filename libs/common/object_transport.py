"""Files between hosts through the JetStream object store, streamed, resumable and verified.

When the hosts of a deployment share no disk (`FLYWHEEL_ARTIFACT_TRANSPORT=nats`), the host
that writes an artifact puts it into the object store bucket `artifacts` and a host that reads
one fetches it into its own artifact directory (libs.common.artifacts holds the rules of when).

The wire layout is the object store's own (`$O.<bucket>.C.<nuid>` chunks, a rolled-up
`$O.<bucket>.M.<name>` meta message with the SHA-256 digest), so `nats object ls/get` and
nats-py's `ObjectStore` read what this writes. The transfers are our own, for what nats-py's
`put`/`get` lack:
- **resumable both ways.** An upload publishes its chunks one at a time, each acked, under a
  nuid kept in a resume record; after a crash the chunks the stream already holds are counted
  and the upload goes on from the next one. A download appends to a partial file and records,
  after each fsync, how many bytes and which stream sequence it reached; it goes on from there.
- **streamed.** Chunks go from the file to the stream and back one at a time: a 1 GB
  checkpoint never sits in memory (nats-py's `get` without a file collects the whole object).
- **verified.** The whole file's sha256 is checked against the object's digest and against
  the digest the caller expects before the file is renamed into place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nats.js.errors
from nats.js import JetStreamContext, api

from libs.common.artifacts import TRANSFERS_DIR, ArtifactError, ArtifactStore, atomic_file, sha256_file

BUCKET = "artifacts"
# Under the server's default 1 MiB max_payload with room for headers. One acked round trip per
# chunk is the cost of an exact resume (see `put_file`); measured with a 128 MiB file and a local
# server on 2 busy cores, up/down: 512 KiB 292/190 MB/s, 128 KiB 153/179, 1000 KiB 126/124, and
# nats-py's own put/get (128 KiB) 104/51.
CHUNK_SIZE = 512 * 1024
# A download records its progress (after an fsync) every this many bytes.
RECORD_EVERY_BYTES = 16 * 1024 * 1024
_DIGEST_PREFIX = "SHA-256="
# How long a download waits for the next chunk before it gives up (the stream holds them all;
# only a lost connection makes one late).
CHUNK_TIMEOUT_S = 30.0


async def connect_store(store: ArtifactStore, js: JetStreamContext, *, replicas: int = 1) -> ArtifactStore:
    """Attach the object store to `store` when its transport is "nats" (no-op when "local")."""
    if store.transport == "nats" and store.objects is None:
        store.attach(await ObjectTransport.open(js, store.root / TRANSFERS_DIR, replicas=replicas))
    return store


def digest_field(sha256_hex: str) -> str:
    """The object store's form of a sha256: `SHA-256=<urlsafe base64>`."""
    return _DIGEST_PREFIX + base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).decode()


def digest_hex(field: str) -> str:
    """A sha256 hex digest from the object store's `SHA-256=` form ("" if it is not one)."""
    if not field or not field.upper().startswith(_DIGEST_PREFIX):
        return ""
    return base64.urlsafe_b64decode(field[len(_DIGEST_PREFIX):]).hex()


@dataclass(frozen=True)
class StoredObject:
    """What the object store holds under a name."""

    name: str
    nuid: str
    size: int
    chunks: int
    sha256: str
    description: str = ""


class ObjectTransport:
    """One object store bucket, with resume records kept under `state_dir`."""

    def __init__(self, js: JetStreamContext, state_dir: Path, *, bucket: str = BUCKET,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self.state_dir = Path(state_dir)
        self.chunk_size = chunk_size

    @classmethod
    async def open(cls, js: JetStreamContext, state_dir: Path, *, bucket: str = BUCKET, replicas: int = 1,
                   chunk_size: int = CHUNK_SIZE) -> ObjectTransport:
        """The bucket, created when missing (any host may be first)."""
        try:
            await js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            config = api.ObjectStoreConfig(
                bucket=bucket, description="Flywheel artifacts: datasets and checkpoints for hosts without a shared disk",
                storage=api.StorageType.FILE, replicas=replicas,
            )
            try:
                await js.create_object_store(bucket, config=config)
            except nats.js.errors.BadRequestError:
                await js.object_store(bucket)  # created concurrently by another service
        return cls(js, state_dir, bucket=bucket, chunk_size=chunk_size)

    # ------------------------------------------------------------------ subjects

    def _chunks_subject(self, nuid: str) -> str:
        return f"$O.{self.bucket}.C.{nuid}"

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    # ------------------------------------------------------------------ looking up

    async def stat(self, name: str) -> StoredObject | None:
        """The object stored under `name`; None when there is none (or it was deleted)."""
        try:
            msg = await self.js.get_last_msg(self.stream, self._meta_subject(name))
        except nats.js.errors.NotFoundError:
            return None
        meta = json.loads(msg.data)
        if meta.get("deleted"):
            return None
        return StoredObject(
            name=meta["name"], nuid=meta["nuid"], size=int(meta.get("size", 0)), chunks=int(meta.get("chunks", 0)),
            sha256=digest_hex(meta.get("digest", "")), description=meta.get("description") or "",
        )

    async def read_small(self, name: str, limit: int = 1 << 20) -> bytes:
        """The content of a small object (a manifest), whole; refuses one over `limit` bytes."""
        stored = await self.stat(name)
        if stored is None:
            raise ArtifactError(f"{name!r} is not in the object store bucket {self.bucket!r}")
        if stored.size > limit:
            raise ArtifactError(f"{name!r} is {stored.size} bytes, more than the {limit} expected of it")
        data = bytearray()
        async for chunk in self._chunks(stored, start_seq=0, skip=0):
            data += chunk
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise ArtifactError(f"{name!r}: content does not match its digest in the object store")
        return bytes(data)

    # ------------------------------------------------------------------ writing

    async def put_file(self, path: Path, name: str, *, sha256: str = "", description: str = "") -> StoredObject:
        """Store the file at `path` as `name` unless the same content is there already.

        Resumable: an upload cut short (crash, lost connection) goes on from the first chunk the
        stream does not hold when it is asked again for the same content under the same name.
        """
        path = Path(path)
        sha256 = sha256 or await asyncio.to_thread(sha256_file, path)
        size = path.stat().st_size
        existing = await self.stat(name)
        if existing is not None and existing.sha256 == sha256 and existing.size == size:
            return existing
        record_path = self._record_path("put", name)
        record = _read_record(record_path)
        if record.get("sha256") == sha256 and record.get("chunk_size") == self.chunk_size and record.get("nuid"):
            nuid = record["nuid"]
            done = await self._stored_chunks(nuid)
        else:
            nuid, done = uuid.uuid4().hex, 0
            _write_record(record_path, {"nuid": nuid, "sha256": sha256, "chunk_size": self.chunk_size})
        subject = self._chunks_subject(nuid)
        chunks = done
        with open(path, "rb") as fh:
            fh.seek(done * self.chunk_size)
            while data := await asyncio.to_thread(fh.read, self.chunk_size):
                # One at a time, each acked: the stream then holds an exact prefix of the file, so
                # a resume that counts the chunks stored knows where to go on. The id drops a
                # chunk republished after a lost ack.
                await self.js.publish(subject, data, stream=self.stream, headers={"Nats-Msg-Id": f"{nuid}.{chunks}"})
                chunks += 1
        stored_size = min(size, chunks * self.chunk_size)
        if stored_size != size or chunks != -(-size // self.chunk_size):
            raise ArtifactError(f"upload of {name!r}: {chunks} chunks stored for {size} bytes; the file changed")
        meta = {
            "name": name, "description": description or None, "headers": None,
            "options": {"max_chunk_size": self.chunk_size}, "bucket": self.bucket, "nuid": nuid,
            "size": size, "chunks": chunks, "mtime": datetime.now(UTC).isoformat(), "digest": digest_field(sha256),
        }
        await self.js.publish(self._meta_subject(name), json.dumps(meta).encode(), stream=self.stream,
                              headers={"Nats-Rollup": "sub"})
        if existing is not None and existing.nuid != nuid:
            await self._purge_chunks(existing.nuid)
        record_path.unlink(missing_ok=True)
        return StoredObject(name=name, nuid=nuid, size=size, chunks=chunks, sha256=sha256, description=description)

    async def put_bytes(self, data: bytes, name: str, *, description: str = "") -> StoredObject:
        """A small object (a manifest) from memory."""
        staged = self.state_dir / f"put-bytes-{uuid.uuid4().hex}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            staged.write_bytes(data)
            return await self.put_file(staged, name, description=description)
        finally:
            staged.unlink(missing_ok=True)

    async def delete(self, name: str) -> None:
        """Remove `name`'s content and mark it deleted (as `nats object rm` does)."""
        existing = await self.stat(name)
        if existing is None:
            return
        meta = {"name": name, "bucket": self.bucket, "nuid": existing.nuid, "size": 0, "chunks": 0,
                "deleted": True, "mtime": datetime.now(UTC).isoformat(), "digest": "", "options": None}
        await self.js.publish(self._meta_subject(name), json.dumps(meta).encode(), stream=self.stream,
                              headers={"Nats-Rollup": "sub"})
        await self._purge_chunks(existing.nuid)

    # ------------------------------------------------------------------ reading

    async def get_file(self, name: str, target: Path, *, sha256: str = "") -> Path:
        """Fetch `name` into `target` (replaced atomically), checked against `sha256` if given.

        Resumable: the bytes already fetched by an attempt that was cut short are kept, and
        the next attempt for the same object goes on from where the last record says.
        """
        stored = await self.stat(name)
        if stored is None:
            raise ArtifactError(f"{name!r} is not in the object store bucket {self.bucket!r}")
        if sha256 and stored.sha256 != sha256:
            raise ArtifactError(f"{name!r} in the object store has sha256 {stored.sha256}, not the expected {sha256}")
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".fetch-{target.name}")
        record_path = self._record_path("get", name)
        record = _read_record(record_path)
        digest = hashlib.sha256()
        if record.get("nuid") == stored.nuid and partial.exists() and partial.stat().st_size >= record.get("bytes", 0):
            done, received, start_seq = record["bytes"], record["chunks"], record["next_seq"]
            with open(partial, "r+b") as fh:
                fh.truncate(done)
            await asyncio.to_thread(_hash_prefix, partial, done, digest)
        else:
            done, received, start_seq = 0, 0, 0
            partial.unlink(missing_ok=True)
        recorded_at = done
        try:
            with open(partial, "ab") as fh:
                async for data, next_seq in self._chunks_with_seq(stored, start_seq=start_seq, skip=received):
                    await asyncio.to_thread(fh.write, data)
                    digest.update(data)
                    done += len(data)
                    received += 1
                    if done - recorded_at >= RECORD_EVERY_BYTES:
                        fh.flush()
                        os.fsync(fh.fileno())
                        _write_record(record_path, {"nuid": stored.nuid, "bytes": done, "chunks": received,
                                                    "next_seq": next_seq})
                        recorded_at = done
                fh.flush()
                os.fsync(fh.fileno())
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise ArtifactError(f"fetching {name!r} stopped after {done} of {stored.size} bytes (it resumes): {exc!r}") from exc
        if done != stored.size or digest.hexdigest() != stored.sha256:
            partial.unlink(missing_ok=True)
            record_path.unlink(missing_ok=True)
            raise ArtifactError(f"{name!r}: fetched {done} bytes with sha256 {digest.hexdigest()}, the object store "
                                f"announced {stored.size} bytes with {stored.sha256}")
        os.replace(partial, target)
        record_path.unlink(missing_ok=True)
        return target

    async def _chunks(self, stored: StoredObject, *, start_seq: int, skip: int):
        async for data, _ in self._chunks_with_seq(stored, start_seq=start_seq, skip=skip):
            yield data

    async def _chunks_with_seq(self, stored: StoredObject, *, start_seq: int, skip: int):
        """The object's chunks from number `skip` on, each with the stream sequence after it."""
        if skip >= stored.chunks:
            return
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq or None,
        )
        sub = await self.js.subscribe(self._chunks_subject(stored.nuid), stream=self.stream, ordered_consumer=True,
                                      config=config)
        try:
            for _ in range(stored.chunks - skip):
                msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
                yield msg.data, msg.metadata.sequence.stream + 1
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # ------------------------------------------------------------------ internals

    async def _stored_chunks(self, nuid: str) -> int:
        subject = self._chunks_subject(nuid)
        info = await self.js.stream_info(self.stream, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def _purge_chunks(self, nuid: str) -> None:
        await self.js.purge_stream(self.stream, subject=self._chunks_subject(nuid))

    def _record_path(self, kind: str, name: str) -> Path:
        return self.state_dir / f"{kind}-{hashlib.sha256(f'{self.bucket}/{name}'.encode()).hexdigest()[:40]}.json"


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}


def _write_record(path: Path, record: dict) -> None:
    with atomic_file(path) as fh:
        fh.write(json.dumps(record).encode())


def _hash_prefix(path: Path, size: int, digest) -> None:
    with open(path, "rb") as fh:
        left = size
        while left and (data := fh.read(min(left, 1 << 20))):
            digest.update(data)
            left -= len(data)
