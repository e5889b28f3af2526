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
from typing import Annotated, Literal

import msgspec

from libs.common.settings import (
    CommonSettings,
    Device,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
)
from services.trainer.packing import Batching


class Hyperparameters(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # How examples become batches (services/trainer/packing.py). "packed": examples first-fit
    # into sequences of at most `pack_length` tokens, each isolated from the others, and
    # micro-batches of sequences within `batch_tokens` (padding included); measured 1.7x the
    # tokens/s of padded batches on the tiny model at a lower held-out loss
    # (docs/experiments/packing-cpu.md). "padded": `batch_size` rows a micro-batch, padded to the
    # longest, as a plain Trainer does.
    batching: Literal["packed", "padded"] = "packed"
    # 1,024 tokens keep a step near the 16 rows measured best on Binary level 1 (~68 tokens a row).
    batch_tokens: Annotated[int, msgspec.Meta(ge=16)] = 1024
    pack_length: Annotated[int, msgspec.Meta(ge=16)] = 256
    # Measured on the tiny model (Binary level 1, the same training time): batch 16 got 78 % of
    # held-out problems right where 32 got 50 % and 8 fell behind both (README, "Making the
    # model learn"). Rows a micro-batch with batching = "padded".
    batch_size: Positive = 16
    # Micro-batches an optimizer step accumulates gradients over (the loss is the token mean of
    # the whole step, as one big batch's would be).
    grad_accumulation: Positive = 1
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
    # A held-out slice of each dataset (never trained on) gives the run's validation loss and
    # train/val gap: this share of its examples, at most `validation_max_rows`, and none for a
    # dataset of fewer than `validation_min_rows` (every row of a small dataset trains).
    validation_fraction: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.05
    validation_max_rows: NonNegative = 64
    validation_min_rows: Positive = 40

    def batching_plan(self) -> Batching:
        return Batching(self.batching, self.batch_tokens, self.pack_length, self.batch_size, self.grad_accumulation)

    def identity(self, max_length: int) -> str:
        """A hash of every field (and the common max_length), for run ids."""
        fields = msgspec.structs.asdict(self) | {"max_length": max_length}
        return hashlib.sha256(msgspec.json.encode(dict(sorted(fields.items())))).hexdigest()


class TrainerSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Read flat: FLYWHEEL_TRAINER_LEARNING_RATE sets hyperparameters.learning_rate.
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)
    save_every_steps: Positive = 50
    # Validation loss on the held-out slice every this many steps (and after the last step).
    validation_every_steps: Positive = 25
    progress_every_steps: Positive = 5
    # A progress event also goes out when this much time passed since the last one.
    progress_every_s: NonNegativeFloat = 2.0
    # auto: cuda when present (fp32 weights, bf16 autocast), else cpu.
    device: Device = "auto"
    # Where runs train (services/trainer/backend.py): "local", this process; "ray", a Ray Train
    # TorchTrainer with `ray_workers` workers on the cluster at `ray_address` (Ray's RAY_ADDRESS
    # sets it too), else on a local Ray cluster; "auto": ray when an address is set, else local.
    backend: Literal["auto", "local", "ray"] = "auto"
    ray_address: str = ""
    ray_workers: Positive = 2


SETTINGS = TrainerSettings
