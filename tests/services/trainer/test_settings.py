"""Unit: the trainer's settings load from env with the documented defaults and refuse nonsense."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.trainer.settings import TrainerSettings


def test_defaults_and_env_overrides():
    settings = load_settings(TrainerSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCH_SIZE": "4"})
    assert settings.batch_size == 4
    assert (settings.max_length, settings.learning_rate, settings.epochs) == (512, 1e-3, 2)
    assert (settings.save_every_steps, settings.progress_every_steps, settings.seed) == (50, 5, 0)
    assert (settings.max_steps, settings.warmup_steps, settings.device, settings.grad_clip) == (0, 10, "auto", 1.0)


@pytest.mark.parametrize("env", [
    {"FLYWHEEL_TRAINER_BATCH_SIZE": "0"},
    {"FLYWHEEL_TRAINER_LEARNING_RATE": "-1"},
    {"FLYWHEEL_TRAINER_DEVICE": "tpu"},
    {"FLYWHEEL_TRAINER_BACH_SIZE": "8"},
])
def test_bad_settings_fail_loudly(env):
    with pytest.raises(SettingsError):
        load_settings(TrainerSettings, "trainer", environ=env)
