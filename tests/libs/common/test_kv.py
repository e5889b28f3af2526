"""Compare-and-set on a real JetStream KV bucket: absent, deleted, conflicting writers."""

from __future__ import annotations

import msgspec
import pytest

from libs.common import topology
from libs.common.kv import MAX_CAS_ATTEMPTS, RevisionConflict, read_entry, write_entry
from libs.common.records import CHAMPION, TRAINER_CONTROL, SkillState, TrainerControl, skill_state

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
    assert await (await bus.record(CHAMPION)).read() == (None, 0)
    revision = await write_entry(kv, "current", b"new", 0)
    assert await read_entry(kv, "current") == (b"new", revision)


async def test_record_change_decides_again_on_a_conflict(bus):
    record = await bus.record(skill_state("binary"))
    other = await bus.record(skill_state("binary"))
    seen: list[int] = []

    async def bump(current, revision):
        seen.append(revision)
        if len(seen) == 1:  # another replica writes between this read and this write
            await other.put(msgspec.structs.replace(current or SkillState(skill="binary"), level=5))
        state = current or SkillState(skill="binary")
        return msgspec.structs.replace(state, level=state.level + 1), state.level + 1

    assert await record.change(bump) == 6  # decided again on the newer value, not 1 -> 2
    assert len(seen) == 2 and (await record.read())[0].level == 6


async def test_record_change_that_keeps_the_value_writes_nothing_and_endless_conflicts_end(bus):
    record = await bus.record(TRAINER_CONTROL)
    assert await record.change(lambda current, revision: (None, "kept")) == "kept"
    assert await record.read() == (None, 0)

    other = await bus.record(TRAINER_CONTROL)

    async def always_overtaken(current, revision):
        await other.put(TrainerControl(mode="paused"))
        return TrainerControl(mode="running"), None

    with pytest.raises(RevisionConflict, match=f"{MAX_CAS_ATTEMPTS} times"):
        await record.change(always_overtaken)


async def test_record_history_is_every_value_oldest_first_and_never_cut_short(bus):
    record = await bus.record(TRAINER_CONTROL)
    assert await record.history() == []
    paused, running = TrainerControl(mode="paused", requested_by="a"), TrainerControl(mode="running", requested_by="b")
    first = await record.write(paused, 0)
    # nats-py's KeyValue.history can return nothing for a key with values while the first one is
    # still in flight (nats-io/nats.py#842); Record.history reads up to the newest stored
    # sequence, so many back-to-back reads of a one-value key all see that value.
    reads = [await record.history() for _ in range(200)]
    assert all(r == [paused] for r in reads)
    await record.write(running, first)
    await record.kv.delete(record.key)  # a delete marker is not a value
    assert await record.history() == [paused, running]
