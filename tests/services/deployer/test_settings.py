"""The promotion rule's settings: defaults as stated, a wrong value stops the deployer with its name."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.deployer.settings import DeployerSettings


def test_defaults_are_the_stated_rule():
    settings = load_settings(DeployerSettings, "deployer", environ={})
    assert (settings.alpha, settings.max_level_drop, settings.max_loss_rise) == (0.05, 0.05, None)
    assert settings.confirm_timeout_s == 120.0  # how long a staged checkpoint waits for inference


def test_values_come_from_the_environment():
    settings = load_settings(DeployerSettings, "deployer", environ={
        "FLYWHEEL_DEPLOYER_ALPHA": "0.01", "FLYWHEEL_DEPLOYER_MAX_LEVEL_DROP": "0.1",
        "FLYWHEEL_DEPLOYER_MAX_LOSS_RISE": "0.5"})
    assert (settings.alpha, settings.max_level_drop, settings.max_loss_rise) == (0.01, 0.1, 0.5)


@pytest.mark.parametrize(("variable", "value"), [
    ("FLYWHEEL_DEPLOYER_ALPHA", "0"),
    ("FLYWHEEL_DEPLOYER_ALPHA", "1.5"),
    ("FLYWHEEL_DEPLOYER_MAX_LEVEL_DROP", "-0.1"),
    ("FLYWHEEL_DEPLOYER_MAX_LEVEL_DROP", "2"),
    ("FLYWHEEL_DEPLOYER_MAX_LOSS_RISE", "-1"),
    ("FLYWHEEL_DEPLOYER_DECISIONS_KEPT", "0"),
    ("FLYWHEEL_DEPLOYER_CONFIRM_TIMEOUT_S", "0"),
    ("FLYWHEEL_DEPLOYER_MIN_GAIN", "0.1"),  # the old rule's setting is gone, not silently ignored
])
def test_a_wrong_value_fails_loudly_with_its_name(variable, value):
    with pytest.raises(SettingsError) as failed:
        load_settings(DeployerSettings, "deployer", environ={variable: value})
    assert variable in str(failed.value) or variable.removeprefix("FLYWHEEL_DEPLOYER_").lower() in str(failed.value)
