"""The trainer's own state: the current weights, the global step, which datasets are done and
which run is pending.

One JSON file under the trainer's service directory, replaced atomically (write aside, fsync,
rename): a crash leaves the old state or the new one, never half of either. The weights change
only when a dataset's run has finished and its final checkpoint is on disk.

A run is *pending* from just before its first step until it finishes, fails for good or is
skipped. An interrupted run (stop, SIGTERM, kill -9, a failure to be retried) stays pending,
and while it does no other dataset trains: otherwise another dataset could change the current
weights first, and the interrupted one would restart from step 0 as a new run (run ids derive
from the starting weights) instead of resuming from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from libs.common.artifacts import Artifact, write_atomically

STATE_FILE = "state.json"


class TrainedDataset(msgspec.Struct, frozen=True):
    dataset_id: str
    uri: str
    # How its rows are read when replayed; state files from before schemas were recorded held
    # chat_sft_v1 datasets only.
    schema: str = "chat_sft_v1"
    # Its row transform (libs.common.profiles), applied again when its rows are replayed.
    profile: str = "none"


class PendingRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run that began and has not ended: its dataset's redelivery resumes it before any other trains."""

    dataset_id: str
    run_id: str
    init_weights: str
    # Where its dataset's message waits: the durable consumer that delivered it and the stream
    # sequence. A message the stream no longer holds, or the consumer settled, never comes back:
    # the pending run is then given up rather than waited for forever.
    consumer: str = ""
    stream_sequence: int = 0


class TrainerState(msgspec.Struct, kw_only=True):
    # URI of the latest finished checkpoint; empty: the base model (nothing trained yet).
    current_weights: str = ""
    current_weights_sha256: str = ""
    global_step: int = 0
    # dataset_id -> URI of the final checkpoint of its run: the idempotency record.
    finished: dict[str, str] = {}
    # The datasets trained, in order: what replay draws earlier rows from.
    trained: list[TrainedDataset] = []
    # The run begun and not yet ended, if any.
    pending: PendingRun | None = None


def load_state(path: Path) -> TrainerState:
    if not path.exists():
        return TrainerState()
    return msgspec.json.decode(path.read_bytes(), type=TrainerState)


def save_state(path: Path, state: TrainerState) -> None:
    write_atomically(path, [msgspec.json.format(msgspec.json.encode(state))])


def record_finished(state: TrainerState, dataset_id: str, dataset_uri: str, checkpoint: Artifact,
                    global_step: int, schema: str = "chat_sft_v1", profile: str = "none") -> TrainerState:
    """The state after a dataset's run finished: its final checkpoint becomes the current weights
    and the run is no longer pending (one write: never trained and still pending)."""
    return TrainerState(
        current_weights=checkpoint.uri,
        current_weights_sha256=checkpoint.sha256,
        global_step=global_step,
        finished={**state.finished, dataset_id: checkpoint.uri},
        trained=[*state.trained, TrainedDataset(dataset_id, dataset_uri, schema, profile)],
        pending=None,
    )


def with_pending(state: TrainerState, pending: PendingRun | None) -> TrainerState:
    """The state with `pending` as the pending run (None: no run pending)."""
    return msgspec.structs.replace(state, pending=pending)


def stale_pending(state: TrainerState) -> PendingRun | None:
    """A pending run whose dataset is already trained (a record left behind): to be cleared."""
    if state.pending is not None and state.pending.dataset_id in state.finished:
        return state.pending
    return None
