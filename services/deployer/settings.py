"""The deployer's typed settings (env `FLYWHEEL_DEPLOYER_<FIELD>`, TOML section `[deployer]`)."""

from __future__ import annotations

from libs.common.settings import CommonSettings, NonNegativeFloat


class DeployerSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Promote only when exact match beats the champion's by more than this.
    min_gain: NonNegativeFloat = 0.0
    # On an exact-match tie, promote only when val_loss is lower by more than this.
    min_loss_gain: NonNegativeFloat = 0.0


SETTINGS = DeployerSettings
