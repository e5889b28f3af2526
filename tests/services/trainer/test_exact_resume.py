"""Slow: kill -9 a training run at random steps, and once in the middle of a checkpoint write; the
restarted run resumes from its last checkpoint, and its loss curve and final weights equal an
uninterrupted run's exactly, step by step, on CPU.

Each run is a real process (resume_worker.py) so SIGKILL is a real crash: nothing is flushed,
closed or checkpointed on the way out. Exact means bitwise: the same seed, data order, RNG
states, optimizer and scheduler state, and the same number of torch threads in every process
make CPU training deterministic, so a resume that restored anything less would show up as a
different float in some step's loss.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from libs.common.artifacts import ArtifactStore
from tests.services.trainer.samples import chat_rows, write_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
RUN_ID = "ds-exact-resume"
SEED = 20240610
SAVE_EVERY = 3
# Long enough for a few checkpoints (every 3 steps), short enough for ~8 process starts on 2 cores.
ROWS = chat_rows(48, seed=11)


class Trial:
    """One run of the dataset, in its own data directory, over as many processes as it takes."""

    def __init__(self, root: Path, make_settings) -> None:
        self.root = root
        settings = make_settings(data_dir=root, epochs=2, save_every_steps=SAVE_EVERY, progress_every_steps=1)
        event = write_dataset(root, ROWS)
        store = ArtifactStore(root / "artifacts")
        self.store = store
        self.run_dir = store.location("checkpoints", RUN_ID)
        self.log = root / "events.jsonl"
        self.spec = root / "spec.json"
        self.spec.write_bytes(msgspec.json.encode({
            "settings": msgspec.to_builtins(settings, enc_hook=str),
            "job": {
                "run_id": RUN_ID, "dataset_id": event.dataset_id, "dataset_path": str(store.path_for(event.uri)),
                "init_weights": "file:///base", "init_path": str(settings.base_model),
                "run_dir": str(self.run_dir), "base_global_step": 0,
            },
            "log": str(self.log),
        }))
        self.kills = 0
        self.processes = 0

    def start(self) -> subprocess.Popen:
        # Output to a file, not a pipe: nobody reads a pipe while the process runs, and a full one
        # would block it.
        self.processes += 1
        self.output = self.root / f"process-{self.processes}.log"
        with open(self.output, "wb") as output:
            return subprocess.Popen([sys.executable, "-m", "tests.services.trainer.resume_worker", str(self.spec)],
                                    cwd=REPO, stdout=output, stderr=subprocess.STDOUT)

    def lines(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [msgspec.json.decode(line) for line in self.log.read_bytes().splitlines()]

    def lines_of(self, pid: int) -> list[dict]:
        """The lines written by process `pid` (each process's first line names it)."""
        lines, mine = [], False
        for line in self.lines():
            if line["subject"] == "training.started":
                mine = line["pid"] == pid
            if mine:
                lines.append(line)
        return lines

    def run_until(self, kill_when: Callable[[subprocess.Popen], bool]) -> bool:
        """Start a process and SIGKILL it once `kill_when(process)` holds; False if it finished first."""
        proc = self.start()
        try:
            while proc.poll() is None:
                if kill_when(proc):
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(timeout=30) == -signal.SIGKILL
                    self.kills += 1
                    return True
                time.sleep(0.001)  # a checkpoint write lasts milliseconds
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._check_exit(proc)
        return False

    def finish(self) -> None:
        proc = self.start()
        proc.wait(timeout=300)
        self._check_exit(proc)

    def _check_exit(self, proc: subprocess.Popen) -> None:
        assert proc.returncode == 0, self.output.read_text()[-4000:]

    def step_reached(self, proc: subprocess.Popen, step: int) -> bool:
        return any(line["subject"] == "training.progress" and line["step"] >= step for line in self.lines_of(proc.pid))

    def writing_checkpoint(self, proc: subprocess.Popen) -> bool:
        """A checkpoint is being written, and an earlier one is complete (the resume has one to use)."""
        # Only once this process has started training: a staging directory left by the previous
        # kill is removed by the recipe's setup, before its training.started.
        if not staging_left(self.run_dir) or not self.lines_of(proc.pid):
            return False
        return any(entry.name.startswith("step-") for entry in os.scandir(self.run_dir))

    def result(self) -> dict:
        [result] = [line for line in self.lines() if line["subject"] == "result"]
        return result

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every step trained, by every process: a step redone after a kill twice."""
        return [(line["step"], line["loss"]) for line in self.lines() if line["subject"] == "training.progress"]

    def final_weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.store.path_for(self.result()["checkpoint"]) / "model.safetensors")


def test_kill_9_at_random_steps_and_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, make_settings,
):
    reference = Trial(tmp_path / "reference", make_settings)
    reference.finish()
    total = reference.result()["step"]
    assert total >= 12, "too few steps for kills to land between checkpoints"
    rng = random.Random(SEED)
    # One kill at a random step, then two in one run (the second interrupts a resumed process);
    # from step 5 on, so a checkpoint (step 3) is normally complete before the kill.
    for name, kill_steps in (("once", [rng.randrange(5, total)]),
                             ("twice", sorted(rng.sample(range(5, total), 2)))):
        trial = Trial(tmp_path / name, make_settings)
        for step in kill_steps:
            assert trial.run_until(partial(trial.step_reached, step=step)), \
                f"{name}: the run finished before step {step} was reached"
        trial.finish()
        assert trial.kills == len(kill_steps)
        assert_resumed_from_checkpoints(trial)
        assert_same_run(trial, reference)

    trial = Trial(tmp_path / "mid-write", make_settings)
    landed = finished = False
    # A write takes milliseconds: a kill can come just after its rename; then try the next one.
    while not landed and not finished:
        finished = not trial.run_until(trial.writing_checkpoint)
        landed = not finished and staging_left(trial.run_dir)
    assert landed, "the run finished before a kill landed while a checkpoint was being written"
    trial.finish()
    assert not staging_left(trial.run_dir)  # the half-written checkpoint was dropped, never used
    assert_resumed_from_checkpoints(trial)
    assert_same_run(trial, reference)


def assert_resumed_from_checkpoints(trial: Trial) -> None:
    """Every restarted process began at a checkpoint at least as recent as the last one announced
    before the kill (one written but not yet announced when the kill came counts too)."""
    starts, announced = [], 0
    for line in trial.lines():
        if line["subject"] == "training.started":
            starts.append((line["start_step"], announced))
        elif line["subject"] == "checkpoint.saved":
            announced = max(announced, line["step"])
    assert starts[0] == (0, 0)
    for start, last_announced in starts[1:]:
        assert start >= last_announced and start % SAVE_EVERY == 0, starts
    assert any(start > 0 for start, _ in starts[1:]), f"no process resumed from a checkpoint: {starts}"


def assert_same_run(trial: Trial, reference: Trial) -> None:
    expected = dict(reference.losses())
    total = reference.result()["step"]
    assert sorted(expected) == list(range(1, total + 1))
    losses = trial.losses()
    assert {step for step, _ in losses} == set(expected), "every step trained, none skipped"
    for step, loss in losses:  # bitwise: the same floats, not merely close ones
        assert loss == expected[step], f"step {step}: {loss!r} after resume, {expected[step]!r} uninterrupted"
    assert trial.result()["finished"] and trial.result()["step"] == total
    a, b = reference.final_weights(), trial.final_weights()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def staging_left(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(entry.name.startswith(".staging-") for entry in os.scandir(run_dir))
