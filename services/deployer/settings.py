"""The deployer's typed settings (env `FLYWHEEL_DEPLOYER_<FIELD>`, TOML section `[deployer]`).

The promotion rule they tune is stated in services/deployer/promotion.py, the confirmation of a
deployment in services/deployer/confirmation.py.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libs.common.settings import (
    CommonSettings,
    Fraction,
    NonNegativeFloat,
    PositiveFloat,
)


class DeployerSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # The paired test's level: promote only when the exact one-sided sign test on the items where
    # candidate and champion disagree gives p <= alpha.
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.05
    # No promotion when any level's accuracy is down by more than this (absolute: 0.05 = 5 points).
    max_level_drop: Fraction = 0.05
    # No promotion when the val loss is up by more than this (relative: 0.15 = 15%). Off by
    # default: the suite's val loss averages over levels not practised yet, and rises while the
    # model grows surer on the levels it does practise (measured: 3.65 -> 5.9 in a 5-minute loop
    # whose accuracy did not fall), so it blocked gains; the rise is still stated in the reason.
    max_loss_rise: NonNegativeFloat | None = None
    # Decisions kept in KV (GET /decisions, `flywheel history`).
    decisions_kept: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    # A staged checkpoint becomes the champion only once an inference replica reports serving it;
    # with no report within this many seconds the deployment fails and the champion stays.
    confirm_timeout_s: PositiveFloat = 120.0


SETTINGS = DeployerSettings
