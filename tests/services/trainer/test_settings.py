"""Unit: the trainer's settings load from env with the documented defaults and refuse nonsense."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.trainer.settings import Hyperparameters, TrainerSettings


def test_defaults_and_env_overrides():
    settings = load_settings(TrainerSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCH_SIZE": "4"})
    h = settings.hyperparameters
    assert h.batch_size == 4
    assert (settings.max_length, h.learning_rate, h.epochs) == (256, 1e-3, 2)
    assert (settings.save_every_steps, settings.progress_every_steps, h.seed) == (50, 5, 0)
    assert (h.max_steps, h.warmup_steps, settings.device, h.grad_clip) == (0, 10, "auto", 1.0)


def test_every_hyperparameter_and_the_common_max_length_are_part_of_the_run_identity():
    base = load_settings(TrainerSettings, "trainer", environ={})
    identity = base.hyperparameters.identity(base.max_length)
    changed = {"batch_size": 4, "learning_rate": 0.5, "weight_decay": 0.1, "warmup_steps": 3, "epochs": 7,
               "max_steps": 9, "max_tokens": 5000, "seed": 11, "grad_clip": 0.5, "policy": "per_dataset", "replay_fraction": 0.1,
               "replay_datasets": 3, "batching": "padded", "batch_tokens": 512, "pack_length": 128,
               "grad_accumulation": 2, "validation_fraction": 0.1, "validation_max_rows": 8, "validation_min_rows": 5}
    # Every field of Hyperparameters is listed here: a new one must be added to this test.
    assert set(changed) == set(Hyperparameters.__struct_fields__)
    for name, value in changed.items():
        other = load_settings(TrainerSettings, "trainer", environ={}, **{name: value})
        assert other.hyperparameters.identity(other.max_length) != identity, name
    assert base.hyperparameters.identity(1024) != identity
    # How the trainer runs (device, reporting) is not part of it.
    quiet = load_settings(TrainerSettings, "trainer", environ={}, progress_every_s=60.0, device="cpu")
    assert quiet.hyperparameters.identity(quiet.max_length) == identity


@pytest.mark.parametrize("env", [
    {"FLYWHEEL_TRAINER_BATCH_SIZE": "0"},
    {"FLYWHEEL_TRAINER_LEARNING_RATE": "-1"},
    {"FLYWHEEL_TRAINER_DEVICE": "tpu"},
    {"FLYWHEEL_TRAINER_BACH_SIZE": "8"},
    {"FLYWHEEL_TRAINER_MAX_LENGTH": "128"},  # common: FLYWHEEL_MAX_LENGTH, one value for every service
])
def test_bad_settings_fail_loudly(env):
    with pytest.raises(SettingsError):
        load_settings(TrainerSettings, "trainer", environ=env)
