"""Unit: the trainer's state: the pending run is recorded, survives a reload (the legacy file), ends
with the run's finish in the same write; the record stays bounded (tests/services/trainer/
test_state_kv.py has the KV record itself)."""

from __future__ import annotations

from pathlib import Path

from libs.common.artifacts import Artifact
from services.trainer.state import (
    TRAINED_KEPT,
    PendingRun,
    TrainerState,
    load_state,
    overflow,
    record_finished,
    save_state,
    stale_pending,
    with_pending,
)

PENDING = PendingRun(dataset_id="d1", run_id="ds-d1-abc", init_weights="file:///base", consumer="trainer-low",
                     stream_sequence=7)


def test_a_pending_run_is_kept_across_a_reload(tmp_path: Path):
    path = tmp_path / "state.json"
    save_state(path, with_pending(TrainerState(global_step=3), PENDING))
    state = load_state(path)
    assert state.pending == PENDING and state.global_step == 3
    save_state(path, with_pending(state, None))
    assert load_state(path).pending is None


def test_a_state_file_from_before_pending_runs_reads_as_none_pending(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_text('{"current_weights": "", "global_step": 0, "finished": {}, "trained": []}')
    assert load_state(path).pending is None


def test_finishing_the_pending_run_clears_it_in_the_same_state():
    state = with_pending(TrainerState(), PENDING)
    done = record_finished(state, "d1", "file:///d1.jsonl", Artifact(uri="file:///ckpt", sha256="s", size=1), 5)
    assert done.pending is None and done.finished == {"d1": "file:///ckpt"} and done.current_weights == "file:///ckpt"


def test_a_pending_record_naming_a_finished_dataset_is_stale():
    assert stale_pending(with_pending(TrainerState(finished={"d1": "file:///c"}), PENDING)) == PENDING
    assert stale_pending(with_pending(TrainerState(), PENDING)) is None
    assert stale_pending(TrainerState()) is None


def test_the_record_keeps_the_newest_trained_datasets_and_names_the_oldest_finished_to_move_out():
    state = TrainerState()
    for i in range(TRAINED_KEPT + 3):
        state = record_finished(state, f"d{i}", f"file:///d{i}", Artifact(uri=f"file:///c{i}", sha256="s", size=1), i)
    assert len(state.trained) == TRAINED_KEPT and state.trained[-1].dataset_id == f"d{TRAINED_KEPT + 2}"
    assert overflow(state) == {"d0": "file:///c0", "d1": "file:///c1", "d2": "file:///c2"}
    assert overflow(TrainerState(finished={"d": "file:///c"})) == {}
