"""Pause, resume and stop: what each command does to the trainer's mode, and the gate the
training loop passes between steps.

Modes: `running` (takes datasets, trains), `paused` (the current step finishes, then the
loop waits with its dataset's lease kept alive; no new dataset is taken), `stopped` (the
current run checkpoints at its current step and releases its dataset for later; no new
dataset is taken until `resume`). The mode is persisted by the service
(`libs.common.records.TRAINER_CONTROL`) so a restarted trainer honours it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from libs.common.records import TrainerMode as Mode

Action = Literal["pause", "resume", "stop"]


@dataclass(frozen=True)
class Decision:
    mode: Mode
    ok: bool
    message: str


def decide(mode: Mode, action: Action) -> Decision:
    """The mode after `action` in `mode`, and what to tell whoever asked."""
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
    raise ValueError(f"unknown control action {action!r}")


class ControlGate:
    """The mode as the training thread sees it; the service's event loop sets it.

    `proceed()` is called by the training loop before every step: it blocks while paused and
    answers False when the run must checkpoint and give its dataset back (stop, shutdown).
    """

    def __init__(self, mode: Mode = "running") -> None:
        self._cond = threading.Condition()
        self._mode: Mode = mode
        self._shutting_down = False
        self._waiting = False

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def waiting(self) -> bool:
        """True while the training loop is held at the gate (paused between steps)."""
        return self._waiting

    def set_mode(self, mode: Mode) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def shut_down(self) -> None:
        """The process is stopping (SIGTERM): every run checkpoints and lets go, paused or not."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    def proceed(self) -> bool:
        with self._cond:
            while self._mode == "paused" and not self._shutting_down:
                self._waiting = True
                self._cond.wait()
            self._waiting = False
            return self._mode == "running" and not self._shutting_down
