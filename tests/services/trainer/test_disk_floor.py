"""Integration on a real small filesystem (tmpfs, mounted here: needs root, skipped otherwise):
the disk floor pauses a run at a step boundary with training.paused and the trainer resumes by
itself once there is room; retention keeps a run's checkpoints bounded and drops the optimizer
state from every kept checkpoint but the one training resumes from.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from services.trainer.checkpoints import find_training_state, list_checkpoints
from tests.conftest import wait_for
from tests.services.trainer.samples import chat_rows, write_dataset
from tests.services.trainer.test_service import Recorder, kv_state, publish, running_trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SIZE_MB = 120


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 120 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
async def recorder(bus) -> Recorder:
    rec = Recorder()
    await rec.attach(bus)
    return rec


def fill(path: Path, leave_free_mb: float) -> None:
    """Write a ballast file until about `leave_free_mb` MB are free."""
    import shutil  # noqa: PLC0415

    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as fh:
        fh.write(b"\0" * max(0, int(free - leave_free_mb * 1e6)))


async def test_below_the_floor_the_run_pauses_at_a_step_and_resumes_by_itself_when_space_is_back(
    bus, recorder, nats_server, make_settings, small_disk,
):
    # The floor 40 MB: a whole tiny checkpoint is ~16 MB.
    settings = make_settings(data_dir=small_disk, batch_size=2, progress_every_steps=1, save_every_steps=3,
                             disk_floor_gb=0.04, keep_last_checkpoints=2)
    event = write_dataset(small_disk, chat_rows(60))  # ~30 steps
    ballast = small_disk / "ballast"
    async with running_trainer(nats_server, settings) as trainer:
        await publish(bus, event)
        [first] = await recorder.wait_for(topology.CHECKPOINT_SAVED)
        fill(ballast, leave_free_mb=20)
        [paused] = await recorder.wait_for(topology.TRAINING_PAUSED)
        await wait_for(lambda: trainer.snapshot()["state"] == "disk_full", "the trainer to show it paused")
        assert paused.run_id == first.run_id and paused.free_bytes < paused.floor_bytes == 40_000_000
        assert "below the floor" in paused.reason and trainer.snapshot()["disk"]["floor_bytes"] == 40_000_000
        saved_while_full = len(recorder.events(topology.CHECKPOINT_SAVED))
        state = await kv_state(bus, settings)
        assert state.pending.run_id == first.run_id and not state.finished
        ballast.unlink()  # an operator frees space: no command needed
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED, timeout=180)
    started = recorder.events(topology.TRAINING_STARTED)
    assert len(started) == 2 and started[1].run_id == first.run_id and started[1].start_step > 0
    assert len(recorder.events(topology.TRAINING_PAUSED)) == 1 and saved_while_full >= 1

    # Retention: the run keeps its newest two checkpoints; only the current weights keep their
    # optimizer state; every kept checkpoint still verifies against its announced hash.
    store = ArtifactStore(small_disk / "artifacts")
    run_dir = store.location("checkpoints", finished.run_id)
    kept = [path for _, path in list_checkpoints(run_dir)]
    announced = {e.uri: e.sha256 for e in recorder.events(topology.CHECKPOINT_SAVED)}
    assert [p.as_uri() for p in kept][-1] == finished.checkpoint_uri and len(kept) == 2
    assert [find_training_state(p) is not None for p in kept] == [False, True]
    for path in kept:
        store.verify(path.as_uri(), announced[path.as_uri()])
    assert msgspec.json.decode(msgspec.json.encode(paused), type=type(paused)) == paused
