"""The evaluator's typed settings (env `FLYWHEEL_EVALUATOR_<FIELD>`, TOML section `[evaluator]`).

`max_length` is common (FLYWHEEL_MAX_LENGTH): the suite is scored within what the trainer trains on.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from libs.common.settings import CommonSettings, Device, Positive, PositiveFloat
from libs.common.skills import binary


class EvaluatorSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    device: Device = "auto"
    # Distinct from any training seed; the suite also draws only from the skill's eval split.
    suite_seed: int = 1_000_003
    suite_max_level: Annotated[int, msgspec.Meta(ge=1, le=binary.MAX_LEVEL)] = 5
    items_per_level: Positive = 16
    batch_size: Positive = 16
    # The longest gold Binary answer up to level 5 (chained) is 76 tokens of the tiny tokenizer.
    max_new_tokens: Positive = 128
    # How often the champion's record is checked for a score on another suite (then it is scored on this one).
    champion_check_s: PositiveFloat = 30.0


SETTINGS = EvaluatorSettings
