"""Shared facts in JetStream KV: one way to read a key and to write it with compare-and-set.

A key never written and a deleted one both read as absent (nats-py's `get` raises
`KeyNotFoundError` for either, and `create` writes over a delete marker). A write names the
revision it read (0: absent) and fails with `RevisionConflict` when someone wrote in between,
so two replicas can never both win.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue


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
