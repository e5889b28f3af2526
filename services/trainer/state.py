"""The trainer's own state: the current weights, the global step and which datasets are done.

One JSON file under the trainer's service directory, replaced atomically (write aside, fsync,
rename): a crash leaves the old state or the new one, never half of either. It changes only
when a dataset's run has finished and its final checkpoint is on disk.
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


class TrainerState(msgspec.Struct, kw_only=True):
    # URI of the latest finished checkpoint; empty: the base model (nothing trained yet).
    current_weights: str = ""
    current_weights_sha256: str = ""
    global_step: int = 0
    # dataset_id -> URI of the final checkpoint of its run: the idempotency record.
    finished: dict[str, str] = {}
    # The datasets trained, in order: what replay draws earlier rows from.
    trained: list[TrainedDataset] = []


def load_state(path: Path) -> TrainerState:
    if not path.exists():
        return TrainerState()
    return msgspec.json.decode(path.read_bytes(), type=TrainerState)


def save_state(path: Path, state: TrainerState) -> None:
    write_atomically(path, [msgspec.json.format(msgspec.json.encode(state))])


def record_finished(state: TrainerState, dataset_id: str, dataset_uri: str, checkpoint: Artifact,
                    global_step: int, schema: str = "chat_sft_v1") -> TrainerState:
    """The state after a dataset's run finished: its final checkpoint becomes the current weights."""
    return TrainerState(
        current_weights=checkpoint.uri,
        current_weights_sha256=checkpoint.sha256,
        global_step=global_step,
        finished={**state.finished, dataset_id: checkpoint.uri},
        trained=[*state.trained, TrainedDataset(dataset_id, dataset_uri, schema)],
    )
