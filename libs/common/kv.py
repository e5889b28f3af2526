"""Shared facts in JetStream KV: one way to read a record and to change it with compare-and-set.

A key never written and a deleted one both read as absent (nats-py's `get` raises
`KeyNotFoundError` for either, and `create` writes over a delete marker). A write names the
revision it read (0: absent) and fails with `RevisionConflict` when someone wrote in between,
so two replicas can never both win. `Record.change` is the read-decide-write loop every
writer uses: on a conflict it reads the newer value and decides again.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from libs.common.records import Key
from libs.common.stored import stored

R = TypeVar("R", bound=msgspec.Struct)
T = TypeVar("T")

# Each conflict means another replica wrote in between; after this many in a row, fail and
# let the caller's redelivery try later rather than spin.
MAX_CAS_ATTEMPTS = 20


class RevisionConflict(Exception):
    """The key changed since the revision the caller read."""


async def read_entry(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """The key's value and revision; (None, 0) when it is absent or deleted."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    return (entry.value or None), entry.revision


async def write_entry(kv: KeyValue, key: str, value: bytes, revision: int) -> int:
    """Store `value` only if the key is still at `revision` (0: absent); the new revision."""
    try:
        if revision == 0:
            return await kv.create(key, value)
        return await kv.update(key, value, last=revision)
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise RevisionConflict(f"{key}: changed since revision {revision}") from exc


class Record(Generic[R]):
    """One typed record in a KV bucket."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, key: Key[R]) -> None:
        self.js = js
        self.kv = kv
        self.key = key.key
        self.kind = key.kind
        # Where JetStream keeps the bucket's values (ADR-8: stream KV_<bucket>, subject $KV.<bucket>.<key>).
        self.stream = f"KV_{key.bucket.name}"
        self.subject = f"$KV.{key.bucket.name}.{key.key}"

    def _decode(self, value: bytes) -> R:
        # Fields a newer writer added are ignored (record types do not forbid unknown fields).
        return msgspec.json.decode(value, type=self.kind)

    async def read(self) -> tuple[R | None, int]:
        """The record and its revision; (None, revision to write over) when there is none."""
        value, revision = await read_entry(self.kv, self.key)
        return (self._decode(value) if value else None), revision

    async def write(self, record: R, revision: int) -> int:
        """Store `record` if the key is still at `revision` (0: absent); raises RevisionConflict."""
        return await write_entry(self.kv, self.key, msgspec.json.encode(record), revision)

    async def put(self, record: R) -> int:
        """Store `record` whatever is there (for a record with a single writer)."""
        return await self.kv.put(self.key, msgspec.json.encode(record))

    async def change(self, decide: Callable[[R | None, int], tuple[R | None, T] | Awaitable[tuple[R | None, T]]]) -> T:
        """Read, let `decide(current, revision)` return (next record or None to keep, result), write
        with compare-and-set; on a conflict read again and decide again. Returns the result.

        `decide` may be a coroutine function (when deciding needs another read, e.g. history).
        """
        for _ in range(MAX_CAS_ATTEMPTS):
            current, revision = await self.read()
            decided = decide(current, revision)
            new, result = await decided if inspect.isawaitable(decided) else decided
            if new is None or new == current:
                return result
            try:
                await self.write(new, revision)
            except RevisionConflict:
                continue
            return result
        raise RevisionConflict(f"{self.key}: changed {MAX_CAS_ATTEMPTS} times in a row while deciding")

    async def history(self) -> list[R]:
        """Every value the bucket still keeps for the key (its history depth), oldest first."""
        # Not `KeyValue.history`: it can return nothing for a key that has values (libs.common.stored).
        return [self._decode(msg.data) async for msg in stored(self.js, self.stream, self.subject) if msg.data]
