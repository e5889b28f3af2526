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
    # The chance that a candidate no better than the champion is EVER promoted over it, however
    # many are tested against it. A candidate past the screen on the selection suite (sign test
    # p <= 0.01, libs.common.paired) is confirmed on the confirmation suite's items, where the j-th
    # confirmation against a champion needs p <= alpha/(j(j+1)) (services/deployer/promotion.py).
    # Simulated with 480 selection and 893 confirmation items (96 a level, 29 at Binary level 1)
    # at independent outcomes (tests/services/deployer/test_false_promotions.py asserts these):
    # 0.9% of 2,000 champions facing 2,000 equal candidates each promoted one (99% upper bound
    # 1.6%; 72% when each was tested at alpha); 0.4% of the candidates spent a confirmation. The
    # power it leaves, measured, for a candidate whose confirmation is the 1st / 2nd / 5th: level 1
    # from 50% to 90% (other levels near 0): 70%, 56%, 34%; from 80% to 95%: 4%, 2%, 0.4% (29
    # items hold little evidence); 10 points better on every level: 65%, 64%, 62% (the regression
    # guard keeps a third).
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.05
    # No promotion when any level's accuracy is down by more than this (absolute: 0.05 = 5 points)
    # against the champion or against the best any champion had on the suite.
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
