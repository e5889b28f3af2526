"""What `/status` reports: the trainer's observable state, folded from the events it publishes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from libs.common.events import CheckpointSaved, Event, TrainingFinished, TrainingProgress, TrainingStarted


@dataclass
class RunStatus:
    """The current (or last) run; updated from the training thread, read by HTTP handlers."""

    active: bool = False
    run_id: str = ""
    dataset_id: str = ""
    step: int = 0
    total_steps: int = 0
    global_step: int = 0
    last_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    last_checkpoint: str = ""
    # The run's dataset rows the trainer dropped, and why (as on training.started).
    num_rows_dropped: int = 0
    dropped_reasons: list[str] = field(default_factory=list)

    def observe(self, event: Event) -> None:
        if isinstance(event, TrainingStarted):
            self.run_id, self.dataset_id = event.run_id, event.dataset_id
            self.step, self.total_steps, self.global_step = event.start_step, event.total_steps, event.global_step
            self.last_loss = self.learning_rate = self.tokens_per_second = None
            self.num_rows_dropped, self.dropped_reasons = event.num_rows_dropped, list(event.dropped_reasons)
        elif isinstance(event, TrainingProgress):
            self.step, self.global_step = event.step, event.global_step
            self.last_loss, self.learning_rate = event.loss, event.learning_rate
            self.tokens_per_second = event.tokens_per_second
        elif isinstance(event, CheckpointSaved):
            self.step, self.global_step, self.last_checkpoint = event.step, event.global_step, event.uri
        elif isinstance(event, TrainingFinished):
            self.global_step, self.last_loss = event.global_step, event.final_loss

    def as_dict(self) -> dict:
        return asdict(self)


def describe_state(mode: str, active: bool, held_at_gate: bool, *, skipping: bool = False) -> str:
    """One word for humans: idle, training, pausing, paused, stopping, stopped or skipping."""
    if active and skipping:
        return "skipping"
    if mode == "stopped":
        return "stopping" if active else "stopped"
    if mode == "paused":
        if not active:
            return "paused"
        return "paused" if held_at_gate else "pausing"
    return "training" if active else "idle"
