"""The curriculum's typed settings (env `FLYWHEEL_CURRICULUM_<FIELD>`, TOML section `[curriculum]`)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from libs.common.settings import CommonSettings, Positive, PositiveFloat, SettingsError
from libs.common.skills import SKILLS


class CurriculumSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Write synthetic datasets when the queue runs low (level tracking runs regardless).
    enabled: bool = True
    # The skills practised, each with its own level. The default trains Binary only: SYLLO
    # answers run to 400-1,400 tokens, far past what the embedded tiny model (max_length 256,
    # ~3M parameters) can learn on two cores; add "syllo" for a real base model.
    skills: list[str] = msgspec.field(default_factory=lambda: ["binary"])
    # A level rises when the champion's selection-suite accuracy at it reached `threshold` in
    # each of its last `window` distinct scores (services/curriculum/progression.py).
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    # One: the champion now. Champions are far rarer than evaluations, and each promotion already
    # had to beat the one before beyond the noise on the same items, so the current champion's
    # score is already the confirmed one; asking 3 champions in a row to hold the bar would leave
    # a mastered level waiting for two more promotions, which data at that level can hardly earn.
    window: Positive = 1
    # Practice is written while fewer than this many datasets wait for or sit in training.
    min_queued: Positive = 2
    # How often the queue depth is read (two consumer-info requests): each second, so practice
    # follows the trainer's last dataset within a second rather than leaving it idle for up to 5.
    poll_interval_s: PositiveFloat = 1.0
    # 1,000 rows, two epochs of 16: 125 steps, about as long on one CPU core as the evaluator
    # takes to score the run's checkpoint on the other, so scoring keeps up with training.
    rows_per_dataset: Positive = 1000
    # The share of a dataset's rows that review earlier levels (spread evenly over them).
    review_fraction: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.25

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown or not self.skills or len(set(self.skills)) != len(self.skills):
            raise SettingsError(f"skills: must name distinct skills among {sorted(SKILLS)}, got {self.skills}")


SETTINGS = CurriculumSettings
