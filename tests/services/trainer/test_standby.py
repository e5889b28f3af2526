"""Integration: one trainer per base model. A second trainer stands by (ready, taking nothing) and
takes over when the first stops (SIGTERM releases the lease) or dies (kill -9: the lease expires),
resuming the pending run from its checkpoint; a trainer that loses its lease stops writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from libs.common import topology
from libs.common.events import utcnow
from libs.common.records import TrainerLease, trainer_lease
from libs.common.runtime import ServiceRuntime
from services.trainer.service import SERVICE, model_identity
from tests.conftest import wait_for
from tests.services.trainer.samples import chat_rows, write_dataset
from tests.services.trainer.test_service import Recorder, kv_state, pending, publish, running_trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Short enough for a test to wait out, in the ratio the defaults keep (renewals a third of it).
LEASE = dict(lease_duration_s=3.0, lease_renew_s=1.0)


@pytest.fixture
async def recorder(bus) -> Recorder:
    rec = Recorder()
    await rec.attach(bus)
    return rec


async def lease_record(bus, settings):
    return await bus.record(trainer_lease(model_identity(Path(settings.base_model))))


async def holder_of(bus, settings) -> str | None:
    lease, _ = await (await lease_record(bus, settings)).read()
    return None if lease is None or lease.released else lease.holder


def assert_trained_once(recorder, dataset_id: str) -> None:
    started = recorder.events(topology.TRAINING_STARTED)
    finished = recorder.events(topology.TRAINING_FINISHED)
    assert [f.dataset_id for f in finished] == [dataset_id]
    assert len({s.run_id for s in started}) == 1 and started[0].start_step == 0
    assert started[-1].start_step > 0, "the second trainer resumed from a checkpoint, not from step 0"
    saved = recorder.events(topology.CHECKPOINT_SAVED)
    # A step saved as the holder stopped may be announced again by the one that resumes there:
    # the same event (id and content), which JetStream drops as a duplicate. Never two checkpoints.
    by_step: dict[int, set[tuple[str, str]]] = {}
    for checkpoint in saved:
        by_step.setdefault(checkpoint.step, set()).add((checkpoint.id, checkpoint.sha256))
    assert all(len(versions) == 1 for versions in by_step.values()), f"a step written twice: {by_step}"
    first_seen = list(dict.fromkeys(c.step for c in saved))
    assert first_seen == sorted(first_seen), "checkpoints out of order"


async def test_a_standby_takes_no_dataset_and_takes_over_at_once_when_the_holder_stops(
    bus, recorder, nats_server, make_settings, data_dir,
):
    settings = msgspec.structs.replace(
        make_settings(batch_size=2, progress_every_steps=1, save_every_steps=3, **LEASE), nats_url=nats_server)
    event = write_dataset(data_dir, chat_rows(40))  # ~20 steps
    holder = ServiceRuntime(SERVICE.name, settings)
    try:
        first = await holder.start(SERVICE)
        async with running_trainer(nats_server, settings) as second:
            status = second.snapshot()
            assert status["state"] == "standby" and status["lease"]["holder"] == first.lease.me
            await publish(bus, event)
            await recorder.wait_for(topology.CHECKPOINT_SAVED)
            assert first.run_status.active and not second.run_status.active
            assert second.snapshot()["state"] == "standby"
            await holder.shut_down()  # what SIGTERM does: checkpoint, release the dataset and the lease
            assert await holder_of(bus, settings) != first.lease.me
            await wait_for(lambda: second.lease.holding, "the standby to take the released lease", timeout=10)
            [finished] = await recorder.wait_for(topology.TRAINING_FINISHED, timeout=120)
            await wait_for(lambda: second.snapshot()["state"] == "idle", "the new holder to finish")
    finally:
        await holder.shut_down()
    assert_trained_once(recorder, event.dataset_id)
    state = await kv_state(bus, settings)
    assert state.finished == {event.dataset_id: finished.checkpoint_uri} and state.holder == second.lease.me
    assert await pending(bus) == 0


async def test_a_standby_takes_over_from_a_trainer_killed_with_sigkill_and_resumes_its_run(
    bus, recorder, nats_server, make_settings, data_dir, tiny_model_dir,
):
    settings = make_settings(batch_size=2, progress_every_steps=1, save_every_steps=3, **LEASE)
    event = write_dataset(data_dir, chat_rows(60))  # ~30 steps
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")},
        "FLYWHEEL_NATS_URL": nats_server, "FLYWHEEL_DATA_DIR": str(data_dir), "FLYWHEEL_BASE_MODEL": str(tiny_model_dir),
        "FLYWHEEL_TRAINER_HTTP_PORT": "0", "FLYWHEEL_TRAINER_DEVICE": "cpu", "FLYWHEEL_TRAINER_BATCHING": "padded",
        "FLYWHEEL_TRAINER_BATCH_SIZE": "2", "FLYWHEEL_MAX_LENGTH": "128", "FLYWHEEL_TRAINER_WARMUP_STEPS": "2",
        "FLYWHEEL_TRAINER_EPOCHS": "1", "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "3",
        "FLYWHEEL_TRAINER_PROGRESS_EVERY_STEPS": "1", "FLYWHEEL_TORCH_THREADS": "1",
        "FLYWHEEL_TRAINER_LEASE_DURATION_S": "3", "FLYWHEEL_TRAINER_LEASE_RENEW_S": "1",
    }
    first = subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env, cwd=Path(__file__).parents[3],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for(lambda: _held_by_pid(bus, settings, first.pid), "the first trainer to take the lease",
                       timeout=120)
        async with running_trainer(nats_server, settings) as second:
            assert second.snapshot()["state"] == "standby"
            await publish(bus, event)
            await recorder.wait_for(topology.CHECKPOINT_SAVED, timeout=120)
            assert not second.run_status.active
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            await wait_for(lambda: second.lease.holding, "the standby to take the expired lease", timeout=30)
            # JetStream redelivers the dataset once its ack wait runs out (60 s); it resumes here.
            [finished] = await recorder.wait_for(topology.TRAINING_FINISHED, timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert_trained_once(recorder, event.dataset_id)
    assert (await kv_state(bus, settings)).finished == {event.dataset_id: finished.checkpoint_uri}


async def _held_by_pid(bus, settings, pid: int) -> bool:
    lease, _ = await (await lease_record(bus, settings)).read()
    return lease is not None and lease.pid == pid and not lease.released


async def test_a_trainer_that_loses_its_lease_stops_at_the_next_step_writing_nothing_and_later_resumes(
    bus, recorder, nats_server, make_settings, data_dir,
):
    settings = make_settings(batch_size=2, progress_every_steps=1, save_every_steps=3, **LEASE)
    event = write_dataset(data_dir, chat_rows(40))
    async with running_trainer(nats_server, settings) as trainer:
        await publish(bus, event)
        [saved] = await recorder.wait_for(topology.CHECKPOINT_SAVED)
        # Another trainer took the model (as after a partition longer than the lease): its write
        # lands between two renewals; it then never renews, so its lease expires in turn.
        record = await lease_record(bus, settings)
        current, revision = await record.read()
        now = utcnow()
        thief = TrainerLease(holder="elsewhere", duration_s=3.0, acquired_at=now, renewed_at=now)
        await record.write(thief, revision)
        await wait_for(lambda: not trainer.lease.holding, "the trainer to notice it lost the lease", timeout=10)
        assert trainer.snapshot()["state"] == "standby"
        state = await kv_state(bus, settings)
        assert state.finished == {} and state.pending.run_id == saved.run_id
        # It takes the expired lease back and resumes the run from its checkpoint.
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED, timeout=180)
    assert current.holder == trainer.lease.me
    started = recorder.events(topology.TRAINING_STARTED)
    assert len(started) == 2 and started[1].run_id == started[0].run_id and started[1].start_step > 0
    # The abandoned run wrote no checkpoint on its way out (a stop would have saved its current
    # step): every checkpoint but the final is a periodic one, and the resume began at the last.
    saved = recorder.events(topology.CHECKPOINT_SAVED)
    assert all(c.step % 3 == 0 for c in saved if not c.final), [c.step for c in saved]
    assert started[1].start_step in {c.step for c in saved}
    assert (await kv_state(bus, settings)).finished == {event.dataset_id: finished.checkpoint_uri}
