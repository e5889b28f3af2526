"""The trainer's typed settings (env `FLYWHEEL_TRAINER_<FIELD>`, or `[trainer]` in the TOML file).

`Hyperparameters` are everything that shapes the trained weights; they are one struct whose
hash is part of every run's identity (`Hyperparameters.identity`), so a field added here can
never be forgotten there. The rest of `TrainerSettings` is how the trainer runs (device,
reporting) and never changes the weights. `max_length` is common (FLYWHEEL_MAX_LENGTH): the
gatekeeper measures rows against the same value.

The defaults suit the embedded tiny model trained from scratch: it needs a learning rate of
1e-3 to move at all within a few hundred steps. A real pretrained base model (Qwen3-0.6B)
wants something like 1e-5 to 2e-5; set FLYWHEEL_TRAINER_LEARNING_RATE for it.
"""

from __future__ import annotations

import hashlib

import msgspec

from typing import Annotated, Literal

from libs.common.settings import (
    CommonSettings,
    Device,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
)


class Hyperparameters(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Measured on the tiny model (Binary level 1, the same training time): batch 16 got 78 % of
    # held-out problems right where 32 got 50 % and 8 fell behind both (README, "Making the
    # model learn").
    batch_size: Positive = 16
    learning_rate: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegative = 10
    epochs: Positive = 2
    # 0 = no cap: train every epoch of every dataset.
    max_steps: NonNegative = 0
    seed: int = 0
    grad_clip: NonNegativeFloat = 1.0
    # The policy across datasets (services/trainer/schedule.py). "continual": AdamW's moments
    # carry over from the weights a run starts from, the learning rate warms up once over the
    # trainer's first `warmup_steps` global steps, and every run decays it by cosine from the
    # peak to 10 % over its own steps, so each scored (final) checkpoint is annealed.
    # "per_dataset": a fresh AdamW and its own warmup + cosine schedule for every dataset.
    policy: Literal["continual", "per_dataset"] = "continual"
    # The share of a run's rows drawn from earlier datasets, so earlier levels are not forgotten.
    replay_fraction: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.3
    # How many of the most recent earlier datasets replay draws from.
    replay_datasets: Positive = 16

    def identity(self, max_length: int) -> str:
        """A hash of every field (and the common max_length), for run ids."""
        fields = msgspec.structs.asdict(self) | {"max_length": max_length}
        return hashlib.sha256(msgspec.json.encode(dict(sorted(fields.items())))).hexdigest()


class TrainerSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Read flat: FLYWHEEL_TRAINER_LEARNING_RATE sets hyperparameters.learning_rate.
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)
    save_every_steps: Positive = 50
    progress_every_steps: Positive = 5
    # A progress event also goes out when this much time passed since the last one.
    progress_every_s: NonNegativeFloat = 2.0
    # auto: cuda when present (fp32 weights, bf16 autocast), else cpu.
    device: Device = "auto"


SETTINGS = TrainerSettings
