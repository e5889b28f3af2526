"""`flywheel status --watch`: a progress bar with the time left for the dataset in training."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flywheel.watch import progress_line, running
from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import TrainingFinished, TrainingProgress, TrainingStarted
from tests.flywheel.test_cli import cli_env, run_cli_async

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def started(run_id: str = "run-1") -> dict:
    return {"run_id": run_id, "time": T0.isoformat()}


def progress(step: int, seconds: float, run_id: str = "run-1", total: int = 400, **reported) -> dict:
    return {"run_id": run_id, "step": step, "total_steps": total, "loss": 0.054, "learning_rate": 9.6e-4,
            "tokens_per_second": 11382.0, "time": (T0 + timedelta(seconds=seconds)).isoformat(), **reported}


def test_the_progress_lines_show_what_the_trainer_reported():
    line = progress_line(started(), progress(100, 50, epoch=0.25, eta_s=150.0, grad_norm=1.214, val_loss=0.0602,
                                             train_val_gap=0.0062), width=20)
    first, second = line.split("\n")
    assert first.startswith("[#####...............] 100/400 25%  epoch 0.25")
    assert "loss 0.0540" in first and "lr 9.6e-04" in first and "11382 tok/s" in first and "ETA 2m30s" in first
    assert second == "grad norm 1.21  val loss 0.0602  gap +0.0062"
    # Before the trainer knows its pace, or from a trainer that did not report these: shown as unknown.
    assert progress_line(started(), progress(0, 1)).endswith("ETA ?")


def test_only_a_run_in_training_that_has_reported_gets_a_bar():
    def status(s, p, f=None):
        return {"training": {"started": s, "progress": p, "finished": f}}

    assert running(status(started(), progress(1, 1))) == (started(), progress(1, 1))
    assert running(status(started(), None)) is None
    assert running(status(started("run-2"), progress(1, 1))) is None  # the progress of an earlier run
    finished = {"run_id": "run-1", "time": (T0 + timedelta(seconds=9)).isoformat()}
    assert running(status(started(), progress(1, 1), finished)) is None  # finished


@pytest.mark.integration
async def test_watch_redraws_the_status_with_the_running_datasets_bar(bus: Bus, nats_server: str, tmp_path: Path):
    await bus.publish(topology.TRAINING_STARTED, TrainingStarted(
        run_id="run-w", dataset_id="d", init_weights="w", total_steps=400, start_step=0, global_step=0))
    await bus.publish(topology.TRAINING_PROGRESS, TrainingProgress(
        run_id="run-w", dataset_id="d", step=100, total_steps=400, global_step=100, loss=0.25,
        learning_rate=1e-3, tokens_per_second=9000.0))
    env = cli_env(tmp_path / "data", nats_server)
    code, out, err = await run_cli_async("status", "--watch", "--frames", "2", "--interval", "0.1", env=env)
    assert code == 0, err
    # Two frames, one after the other into a pipe (no screen clearing), each with the bar.
    assert out.count("run-w\n[") == 2 and "100/400 25%" in out and "loss 0.2500" in out
    assert "\x1b[2J" not in out

    await bus.publish(topology.TRAINING_FINISHED, TrainingFinished(
        run_id="run-w", dataset_id="d", global_step=400, final_loss=0.1, checkpoint_uri="u", duration_s=1.0))
    code, out, _ = await run_cli_async("status", "--watch", "--frames", "1", env=env)
    assert code == 0 and "100/400" not in out and "last finished   run-w" in out
