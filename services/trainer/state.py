"""The trainer's own state: the current weights, the global step, which datasets are done and
which run is pending.

One JetStream KV record per base model (`libs.common.records.trainer_state`), written only by the
trainer that holds the model's lease (services/trainer/lease.py), always with compare-and-set on
the revision it read: a trainer that lost the lease and still writes fails loudly
(`StaleState`) instead of overwriting its successor's state. Whoever takes the lease rewrites
the record first (`holder`), so even a writer that never noticed it lost the lease is fenced off.
The weights change only when a dataset's run has finished and its final checkpoint is on disk.

A run is *pending* from just before its first step until it finishes, fails for good or is
skipped. An interrupted run (stop, SIGTERM, kill -9, a failure to be retried) stays pending,
and while it does no other dataset trains: otherwise another dataset could change the current
weights first, and the interrupted one would restart from step 0 as a new run (run ids derive
from the starting weights) instead of resuming from its checkpoint.

The record stays small whatever the history: `trained` keeps the newest TRAINED_KEPT datasets
(replay draws from at most that many), and `finished` the newest FINISHED_KEPT; older finished
datasets move to keys of their own (written before they leave the record, so at every moment
a finished dataset is found in one place or the other).

Versions before this one kept the state in `<data_dir>/trainer/state.json`: it is migrated
into KV once at start and renamed aside (`state.json.migrated`).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from libs.common.artifacts import Artifact, write_atomically
from libs.common.kv import Record, RevisionConflict
from libs.common.log import get_logger
from libs.common.records import (
    FinishedDataset,
    Key,
    PendingRun,
    TrainedDataset,
    TrainerState,
)

__all__ = ["STATE_FILE", "PendingRun", "StateRecord", "StaleState", "TrainedDataset", "TrainerState", "load_state",
           "record_finished", "save_state", "stale_pending", "with_pending"]

STATE_FILE = "state.json"
MIGRATED_SUFFIX = ".migrated"
# Bounds on the record (a KV value must fit in one NATS message, 1 MB by default: at ~500 bytes
# a dataset, an unbounded record would stop the trainer after ~2,000 datasets).
TRAINED_KEPT = 256
FINISHED_KEPT = 256

log = get_logger("trainer.state")


class StaleState(RevisionConflict):
    """The state record changed since this trainer read it: another trainer holds the model."""


# ---------------------------------------------------------------------------- decisions


def record_finished(state: TrainerState, dataset_id: str, dataset_uri: str, checkpoint: Artifact,
                    global_step: int, schema: str = "chat_sft_v1", profile: str = "none") -> TrainerState:
    """The state after a dataset's run finished: its final checkpoint becomes the current weights
    and the run is no longer pending (one write: never trained and still pending)."""
    return msgspec.structs.replace(
        state,
        current_weights=checkpoint.uri,
        current_weights_sha256=checkpoint.sha256,
        global_step=global_step,
        finished={**state.finished, dataset_id: checkpoint.uri},
        trained=[*state.trained, TrainedDataset(dataset_id, dataset_uri, schema, profile)][-TRAINED_KEPT:],
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


def overflow(state: TrainerState) -> dict[str, str]:
    """The oldest finished datasets beyond FINISHED_KEPT: to move to keys of their own."""
    extra = len(state.finished) - FINISHED_KEPT
    return dict(list(state.finished.items())[:extra]) if extra > 0 else {}


# ---------------------------------------------------------------------------- the legacy file


def load_state(path: Path) -> TrainerState:
    """A state file of the versions before KV (or one a test writes); empty when there is none."""
    if not path.exists():
        return TrainerState()
    return msgspec.json.decode(path.read_bytes(), type=TrainerState)


def save_state(path: Path, state: TrainerState) -> None:
    write_atomically(path, [msgspec.json.format(msgspec.json.encode(state))])


# ---------------------------------------------------------------------------- the KV record


class StateRecord:
    """The trainer's state in KV for one base model, as this trainer last read or wrote it."""

    def __init__(self, record: Record[TrainerState], finished_key) -> None:
        self.record = record
        # dataset_id -> Record[FinishedDataset] (records.trainer_finished bound to the model).
        self._finished_key = finished_key
        self.state = TrainerState()
        self.revision = 0

    async def load(self) -> TrainerState:
        """Read the record afresh (taking the lease, or at start)."""
        state, self.revision = await self.record.read()
        self.state = state or TrainerState()
        return self.state

    async def save(self, state: TrainerState) -> None:
        """Write `state` over the revision this trainer read; StaleState when another wrote since."""
        try:
            self.revision = await self.record.write(state, self.revision)
        except RevisionConflict as exc:
            raise StaleState(f"trainer state {self.record.key} changed since revision {self.revision}: another "
                             "trainer holds this model; nothing written") from exc
        self.state = state
        if moved := overflow(state):
            await self._move_out(moved)

    async def _move_out(self, moved: dict[str, str]) -> None:
        """Move the oldest finished datasets to keys of their own, then drop them from the record."""
        for dataset_id, checkpoint_uri in moved.items():
            await (await self._finished_key(dataset_id)).put(FinishedDataset(checkpoint_uri=checkpoint_uri))
        kept = {d: uri for d, uri in self.state.finished.items() if d not in moved}
        await self.save(msgspec.structs.replace(self.state, finished=kept))

    async def finished_checkpoint(self, dataset_id: str) -> str | None:
        """The final checkpoint of `dataset_id`'s run if it was trained (None: it was not)."""
        if uri := self.state.finished.get(dataset_id):
            return uri
        moved, _ = await (await self._finished_key(dataset_id)).read()
        return moved.checkpoint_uri if moved else None

    async def migrate(self, path: Path) -> bool:
        """Move a state file of an older version into KV once; True when it did.

        Created only where the model has no record yet (compare-and-set on "absent"): a record
        another trainer wrote wins over an old file. The file is renamed aside either way, so it
        is never read again.
        """
        if not path.exists():
            return False
        legacy = load_state(path)
        current, revision = await self.record.read()
        migrated = False
        if current is None:
            moved = overflow(legacy)
            for dataset_id, checkpoint_uri in moved.items():  # before they leave the record
                await (await self._finished_key(dataset_id)).put(FinishedDataset(checkpoint_uri=checkpoint_uri))
            state = msgspec.structs.replace(
                legacy, finished={d: uri for d, uri in legacy.finished.items() if d not in moved},
                trained=legacy.trained[-TRAINED_KEPT:])
            try:
                self.revision = await self.record.write(state, revision)
            except RevisionConflict:
                pass  # another trainer created it meanwhile: its record wins
            else:
                self.state, migrated = state, True
        aside = path.with_name(path.name + MIGRATED_SUFFIX)
        path.rename(aside)
        log.warning("trainer state file migrated into KV" if migrated else
                    "trainer state file ignored: KV already holds this model's state",
                    file=str(aside), key=self.record.key, datasets_finished=len(legacy.finished),
                    current_weights=legacy.current_weights or "base")
        return migrated


async def bind(bus, state_key: Key[TrainerState], finished_key) -> StateRecord:
    """The state record of a model on `bus` (`finished_key(dataset_id)` names a moved dataset's key)."""

    async def finished_record(dataset_id: str) -> Record[FinishedDataset]:
        return await bus.record(finished_key(dataset_id))

    return StateRecord(await bus.record(state_key), finished_record)
