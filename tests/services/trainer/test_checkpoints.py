"""Unit: checkpoint discovery by numeric step, atomic writes, run identity, the state file."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from libs.common.artifacts import Artifact
from services.trainer.checkpoints import (
    INFO_FILE,
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    parse_step,
    read_info,
    remove_staging,
    run_id_for,
    step_dir_name,
    write_checkpoint,
)
from services.trainer.settings import Hyperparameters
from services.trainer.state import TrainerState, load_state, record_finished, save_state


def info(step: int, final: bool = False) -> CheckpointInfo:
    return CheckpointInfo(run_id="r", step=step, global_step=step, total_steps=10, dataset_id="d",
                          init_weights="file:///base", final=final, loss=1.0)


def make_complete(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    path.mkdir(parents=True)
    (path / INFO_FILE).write_bytes(msgspec.json.encode(info(parse_step(name) or 0)))
    return path


def test_latest_is_chosen_by_step_number_not_by_string_order(tmp_path):
    for name in ("step-9", "step-10", "step-2"):
        make_complete(tmp_path, name)
    assert latest_checkpoint(tmp_path).name == "step-10"
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 9, 10]


def test_incomplete_and_foreign_directories_are_ignored(tmp_path):
    make_complete(tmp_path, "step-00000003")
    (tmp_path / "step-00000007").mkdir()  # no flywheel.json: never finished
    (tmp_path / ".staging-step-00000009-x").mkdir()
    (tmp_path / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_parse_step():
    assert parse_step(step_dir_name(12)) == 12 and step_dir_name(12) == "step-00000012"
    assert parse_step("step-x") is None and parse_step("step-1.tmp") is None


def test_write_checkpoint_renames_a_complete_directory_into_place(tmp_path):
    target = tmp_path / "run" / step_dir_name(5)
    assert write_checkpoint(target, info(5), lambda d: (d / "model.bin").write_bytes(b"w"))
    assert (target / "model.bin").read_bytes() == b"w" and read_info(target).step == 5
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "run" / step_dir_name(5)

    def crash(staging: Path) -> None:
        (staging / "model.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(target, info(5), crash)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_saving_the_same_step_twice_keeps_the_first(tmp_path):
    target = tmp_path / "run" / step_dir_name(5)
    write_checkpoint(target, info(5), lambda d: (d / "w").write_bytes(b"first"))
    assert not write_checkpoint(target, info(5), lambda d: (d / "w").write_bytes(b"second"))
    assert (target / "w").read_bytes() == b"first"


def test_remove_staging_drops_leftovers_only(tmp_path):
    make_complete(tmp_path, "step-00000001")
    (tmp_path / ".staging-step-00000002-abc").mkdir()
    remove_staging(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_run_id_is_stable_and_changes_with_weights_or_recipe():
    recipe = Hyperparameters().identity(512)
    run = run_id_for("a" * 64, "file:///base", recipe)
    assert run == run_id_for("a" * 64, "file:///base", Hyperparameters().identity(512))
    assert run.startswith("ds-aaaaaaaaaaaa-")
    assert run != run_id_for("a" * 64, "file:///ckpt", recipe)
    assert run != run_id_for("a" * 64, "file:///base", Hyperparameters(batch_size=4).identity(512))


def test_state_file_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "trainer" / "state.json"
    assert load_state(path) == TrainerState()
    state = record_finished(TrainerState(), "d1", "file:///d1.jsonl", Artifact("file:///c1", "sha1", 1), 12)
    state = record_finished(state, "d2", "file:///d2.jsonl", Artifact("file:///c2", "sha2", 1), 20)
    save_state(path, state)
    loaded = load_state(path)
    assert loaded == state
    assert loaded.current_weights == "file:///c2" and loaded.global_step == 20
    assert loaded.finished == {"d1": "file:///c1", "d2": "file:///c2"}
    assert [(t.dataset_id, t.uri) for t in loaded.trained] == [("d1", "file:///d1.jsonl"), ("d2", "file:///d2.jsonl")]
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
