"""Fault tests on the real stack: kill -9 the trainer mid-dataset; it resumes where it stopped."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import msgspec
import pytest

from flywheel.demo import SAMPLE_DATASET, free_port_base
from flywheel.submit import submit_file
from flywheel.supervisor import Supervisor
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import CheckpointSaved, TrainingFinished, TrainingStarted
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(400)]


async def _supervise(sup: Supervisor, until: asyncio.Event) -> None:
    while not until.is_set():
        sup.poll()
        await asyncio.sleep(0.2)


async def test_trainer_killed_mid_dataset_resumes_from_its_last_checkpoint(tmp_path: Path):
    env = {**os.environ, "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "10", "FLYWHEEL_TRAINER_EPOCHS": "2",
           "FLYWHEEL_TRAINER_BATCH_SIZE": "16", "FLYWHEEL_MAX_LENGTH": "256"}
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), services=("gatekeeper", "trainer"), environ=env)
    sup.start()
    done = asyncio.Event()
    supervising = asyncio.create_task(_supervise(sup, done))
    bus = await Bus.connect([sup.nats_url], "fault-test")
    started: list[TrainingStarted] = []
    saved: list[CheckpointSaved] = []
    finished: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_started(msg):
        started.append(msgspec.json.decode(msg.data, type=TrainingStarted))

    async def on_saved(msg):
        saved.append(msgspec.json.decode(msg.data, type=CheckpointSaved))

    async def on_finished(msg):
        if not finished.done():
            finished.set_result(msgspec.json.decode(msg.data, type=TrainingFinished))

    try:
        await bus.ensure_topology()
        await bus.nc.subscribe(topology.TRAINING_STARTED, cb=on_started)
        await bus.nc.subscribe(topology.CHECKPOINT_SAVED, cb=on_saved)
        await bus.nc.subscribe(topology.TRAINING_FINISHED, cb=on_finished)
        result = await submit_file(bus, ArtifactStore(sup.data_dir / "artifacts"), SAMPLE_DATASET, wait_s=120)
        assert result.outcome == "accepted"
        await wait_for(lambda: saved, "a checkpoint before the kill", timeout=180)
        victim = sup.children["trainer"].process
        os.kill(victim.pid, signal.SIGKILL)
        killed_after = saved[-1].step
        # JetStream redelivers after the lease (ack wait) runs out; the restarted trainer resumes.
        done_event = await asyncio.wait_for(finished, 300)
    finally:
        done.set()
        await supervising
        await bus.close()
        sup.stop()

    assert sup.children["trainer"].restarts == 1
    assert len(started) >= 2 and started[0].start_step == 0
    resumed = started[-1]
    assert resumed.run_id == started[0].run_id and resumed.start_step >= killed_after > 0
    assert done_event.run_id == resumed.run_id and done_event.global_step == resumed.total_steps
    steps = [c.step for c in saved if c.run_id == resumed.run_id]
    assert steps == sorted(set(steps)), "no checkpoint was written twice or out of order"
