"""The curriculum's typed settings (env `FLYWHEEL_CURRICULUM_<FIELD>`, TOML section `[curriculum]`)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from libs.common.settings import CommonSettings, NonNegativeFloat, Positive, PositiveFloat
from libs.common.skills import binary


class CurriculumSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Write synthetic datasets when the queue is idle (level tracking runs regardless).
    enabled: bool = True
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    # Evaluations in a row at >= threshold needed to raise the level.
    window: Positive = 2
    max_level: Annotated[int, msgspec.Meta(ge=1, le=binary.MAX_LEVEL)] = binary.MAX_LEVEL
    poll_interval_s: PositiveFloat = 5.0
    idle_seconds: NonNegativeFloat = 60.0
    rows_per_dataset: Positive = 200


SETTINGS = CurriculumSettings
