"""Compare-and-set on a real JetStream KV bucket: absent, deleted, conflicting writers."""

from __future__ import annotations

import pytest

from libs.common import topology
from libs.common.kv import RevisionConflict, read_entry, write_entry
from services.inference.champion import BASE, read_champion

pytestmark = pytest.mark.integration


async def test_absent_key_reads_as_none_at_revision_zero(bus):
    kv = await bus.kv(topology.CHAMPION_BUCKET)
    assert await read_entry(kv, "nothing") == (None, 0)


async def test_write_then_read_and_stale_revision_conflicts(bus):
    kv = await bus.kv(topology.CURRICULUM_BUCKET)
    first = await write_entry(kv, "binary", b"one", 0)
    assert await read_entry(kv, "binary") == (b"one", first)
    second = await write_entry(kv, "binary", b"two", first)
    with pytest.raises(RevisionConflict):
        await write_entry(kv, "binary", b"stale", first)
    with pytest.raises(RevisionConflict):
        await write_entry(kv, "binary", b"again", 0)
    assert await read_entry(kv, "binary") == (b"two", second)


async def test_deleted_key_reads_as_absent_and_can_be_written_over(bus):
    kv = await bus.kv(topology.CHAMPION_BUCKET)
    await write_entry(kv, "current", b'{"x": 1}', 0)
    await kv.delete("current")
    assert await read_entry(kv, "current") == (None, 0)
    # Readers treat a deleted champion as "none yet", not as an error.
    assert await read_champion(kv) == BASE
    revision = await write_entry(kv, "current", b"new", 0)
    assert await read_entry(kv, "current") == (b"new", revision)
