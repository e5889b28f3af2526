"""One training run in a process of its own, for the kill -9 trials of test_exact_resume.py.

    python -m tests.services.trainer.resume_worker SPEC.json

SPEC.json: {"settings": TrainerSettings as JSON, "job": the TrainingJob's fields, "log": a path}.
The run resumes from its latest checkpoint when there is one, as the trainer's redelivery does.
Every event the recipe emits becomes one JSON line appended to `log` with a single write, so a
parent that kills this process with SIGKILL reads each line whole or not at all; the last line,
`{"subject": "result", ...}`, says how the run ended.

It uses the recipe's public surface only (FullFinetuneRecipe(settings, job, store, gate, emit),
setup, train, cleanup): the recipe's internals may change, what it promises may not.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec

from libs.common.artifacts import ArtifactStore
from libs.common.events import CheckpointSaved, Event, TrainingProgress, TrainingStarted
from libs.common.runtime import limit_torch_threads
from services.trainer.settings import TrainerSettings


class Spec(msgspec.Struct):
    settings: dict[str, Any]
    job: dict[str, Any]
    log: str


def _as_path(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(kind)


class Log:
    """JSON lines, each appended with one write(2): whole after a SIGKILL, or absent."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # Checkpoints are announced from the recipe's writer thread, progress from its own.
        self._lock = threading.Lock()

    def write(self, **line: Any) -> None:
        with self._lock:
            os.write(self._fd, msgspec.json.encode(line) + b"\n")

    def emit(self, subject: str, event: Event) -> None:
        if isinstance(event, TrainingStarted):
            self.write(subject=subject, pid=os.getpid(), start_step=event.start_step, total_steps=event.total_steps)
        elif isinstance(event, TrainingProgress):
            self.write(subject=subject, step=event.step, loss=event.loss)
        elif isinstance(event, CheckpointSaved):
            self.write(subject=subject, step=event.step, final=event.final, uri=event.uri)


def main(spec_path: str) -> None:
    spec = msgspec.json.decode(Path(spec_path).read_bytes(), type=Spec)
    settings = msgspec.convert(spec.settings, TrainerSettings, dec_hook=_as_path)
    # As the service does: the same number of threads in every process of a trial.
    limit_torch_threads(settings.torch_threads)

    from services.trainer.control import ControlGate
    from services.trainer.recipe import FullFinetuneRecipe, TrainingJob

    job = TrainingJob(**{name: Path(v) if name.endswith(("_path", "_dir")) else v for name, v in spec.job.items()})
    log = Log(spec.log)
    store = ArtifactStore(Path(settings.data_dir) / "artifacts")
    recipe = FullFinetuneRecipe(settings, job, store, ControlGate(), log.emit)
    try:
        recipe.setup()
        result = recipe.train()
    finally:
        recipe.cleanup()
    log.write(subject="result", finished=result.finished, step=result.step,
              checkpoint=result.checkpoint.uri if result.checkpoint else "")


if __name__ == "__main__":
    main(sys.argv[1])
