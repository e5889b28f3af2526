"""Pause, resume, stop and skip: what each command does to the trainer's mode, and the gate the
training loop passes between steps.

Modes: `running` (takes datasets, trains), `paused` (the current step finishes, then the
loop waits with its dataset's lease kept alive; no new dataset is taken), `stopped` (the
current run checkpoints at its current step and releases its dataset for later; no new
dataset is taken until `resume`). The mode is persisted by the service
(`libs.common.records.TRAINER_CONTROL`) so a restarted trainer honours it.

`skip` changes no mode: it ends the current run at once and gives its dataset up for good
(acked, announced as failed with who skipped it and why, never recorded as trained). It needs
a reason, and a run to skip.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from libs.common.records import TrainerMode as Mode

Action = Literal["pause", "resume", "stop", "skip"]


@dataclass(frozen=True)
class Decision:
    mode: Mode
    ok: bool
    message: str


def decide(mode: Mode, action: Action, *, training: bool = False, reason: str = "") -> Decision:
    """The mode after `action` in `mode`, and what to tell whoever asked.

    `training`: a run is under way (what `skip` acts on); `reason`: why to skip it.
    """
    if action == "pause":
        if mode == "stopped":
            return Decision(mode, False, "trainer is stopped; resume it first")
        return Decision("paused", True, "already paused" if mode == "paused" else "pausing after the current step")
    if action == "resume":
        return Decision("running", True, "already running" if mode == "running" else "resuming")
    if action == "stop":
        if mode == "stopped":
            return Decision(mode, True, "already stopped")
        return Decision("stopped", True, "stopping: checkpoint at the current step, dataset released until resume")
    if action == "skip":
        if not reason.strip():
            return Decision(mode, False, "a skip needs a reason")
        if not training:
            return Decision(mode, False, "nothing is training; nothing to skip")
        return Decision(mode, True, "skipping the current run: its dataset is given up, not trained")
    raise ValueError(f"unknown control action {action!r}")


@dataclass(frozen=True)
class Skip:
    """A skip of the current run: who asked and why (said on its training.failed)."""

    requested_by: str
    reason: str


class ControlGate:
    """The mode as the training thread sees it; the service's event loop sets it.

    `proceed()` is called by the training loop before every step: it blocks while paused and
    answers False when the run must end now: stop and shutdown (checkpoint, give the dataset
    back), or skip (`skip_requested` is then set: no checkpoint is needed, the run is given up).
    """

    def __init__(self, mode: Mode = "running") -> None:
        self._cond = threading.Condition()
        self._mode: Mode = mode
        self._shutting_down = False
        self._waiting = False
        self._skip: Skip | None = None
        # Why the run must end without writing anything (the lease was lost, the disk is full).
        self._abandon: str | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def waiting(self) -> bool:
        """True while the training loop is held at the gate (paused between steps)."""
        return self._waiting

    @property
    def skip_requested(self) -> Skip | None:
        """The skip of the current run, if one was asked for (None otherwise)."""
        return self._skip

    @property
    def abandoned(self) -> str | None:
        """Why the current run must end without a checkpoint or any record (None: it need not)."""
        return self._abandon

    @property
    def must_end(self) -> bool:
        """True when the run must end at its next step whatever the mode (shutdown, skip, lease
        lost); a gate in another process (the Ray backend's) mirrors this and `mode`."""
        return self._shutting_down or self._skip is not None or self._abandon is not None

    def set_mode(self, mode: Mode) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def shut_down(self) -> None:
        """The process is stopping (SIGTERM): every run checkpoints and lets go, paused or not."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    def skip(self, skip: Skip) -> None:
        """End the current run at its next step, paused or not, and give its dataset up."""
        with self._cond:
            self._skip = skip
            self._cond.notify_all()

    def clear_skip(self) -> None:
        """A new run begins: a skip (or an abandon) of the previous one does not carry over."""
        with self._cond:
            self._skip = None
            self._abandon = None

    def abandon(self, reason: str) -> None:
        """End the current run at its next step, paused or not, writing nothing (another trainer
        holds the model now: its checkpoints and state are not this one's to write)."""
        with self._cond:
            self._abandon = reason
            self._cond.notify_all()

    def proceed(self) -> bool:
        with self._cond:
            while self._mode == "paused" and not self.must_end:
                self._waiting = True
                self._cond.wait()
            self._waiting = False
            return self._mode == "running" and not self.must_end
