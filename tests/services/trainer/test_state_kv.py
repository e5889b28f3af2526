"""Integration: the trainer's state record in KV on a real nats-server: a stale writer's
compare-and-set fails loudly, an old state file is migrated once, old finished datasets move to
keys of their own and are still found."""

from __future__ import annotations

from functools import partial

import msgspec
import pytest

from libs.common.artifacts import Artifact
from libs.common.records import trainer_finished, trainer_state
from services.trainer import state
from services.trainer.state import (
    FINISHED_KEPT,
    STATE_FILE,
    PendingRun,
    StaleState,
    TrainerState,
    record_finished,
    save_state,
    with_pending,
)

pytestmark = pytest.mark.integration

PENDING = PendingRun(dataset_id="d1", run_id="ds-d1-abc", init_weights="file:///base")


async def bound(bus, model: str = "m1") -> state.StateRecord:
    return await state.bind(bus, trainer_state(model), partial(trainer_finished, model))


async def test_a_stale_writer_fails_instead_of_overwriting_the_new_holders_state(bus):
    old_holder, new_holder = await bound(bus), await bound(bus)
    await old_holder.load()
    await old_holder.save(with_pending(TrainerState(), PENDING))
    # The new holder takes over: reads and fences (its write moves the revision on).
    taken = await new_holder.load()
    await new_holder.save(msgspec.structs.replace(taken, holder="new"))
    with pytest.raises(StaleState, match="another trainer holds this model"):
        await old_holder.save(with_pending(old_holder.state, None))
    current, _ = await new_holder.record.read()
    assert current.holder == "new" and current.pending == PENDING


async def test_a_state_file_is_migrated_once_and_renamed_aside(bus, tmp_path):
    path = tmp_path / STATE_FILE
    legacy = record_finished(TrainerState(), "d1", "file:///d1", Artifact("file:///c1", "s1", 1), 4)
    save_state(path, legacy)
    record = await bound(bus)
    assert await record.migrate(path)
    assert not path.exists() and (tmp_path / "state.json.migrated").exists()
    assert (await record.load()) == legacy
    # A file that turns up later (an old copy restored) never overwrites the record.
    save_state(path, TrainerState(global_step=99))
    assert not await (await bound(bus)).migrate(path)
    assert (await record.load()).global_step == 4 and not path.exists()


async def test_old_finished_datasets_move_to_their_own_keys_and_are_still_found(bus):
    record = await bound(bus)
    await record.load()
    current = TrainerState()
    for i in range(FINISHED_KEPT + 2):
        current = record_finished(current, f"d{i}", f"file:///d{i}", Artifact(f"file:///c{i}", "s", 1), i)
    await record.save(current)
    stored, _ = await record.record.read()
    assert len(stored.finished) == FINISHED_KEPT and "d0" not in stored.finished
    assert await record.finished_checkpoint("d0") == "file:///c0"
    assert await record.finished_checkpoint(f"d{FINISHED_KEPT + 1}") == f"file:///c{FINISHED_KEPT + 1}"
    assert await record.finished_checkpoint("never") is None
