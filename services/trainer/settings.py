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
    SettingsError,
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
    # A run's budget in real (non-padding) tokens, as training.progress counts them in tokens/s:
    # the run ends at the optimizer step that reaches it (if `epochs` and `max_steps` have not
    # ended it first), and its cosine schedule is planned over those steps, so the final
    # checkpoint is annealed. Machines differ by 3x and more: tokens, unlike minutes, do not.
    # 0 = no cap.
    max_tokens: NonNegative = 0
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
    # How many of the most recent earlier datasets replay draws from (the trainer's state keeps
    # the newest TRAINED_KEPT, services/trainer/state.py).
    replay_datasets: Annotated[int, msgspec.Meta(gt=0, le=256)] = 16
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

    # One trainer trains a base model at a time (services/trainer/lease.py): the holder renews
    # its lease every `lease_renew_s`; another trainer waits as a hot standby and takes over once
    # the lease went `lease_duration_s` without a renewal (the holder died) or was released
    # (SIGTERM). The holder stops its run when it could not renew for `lease_duration_s -
    # lease_renew_s`, before anyone may take over. Measured on loopback, 2 shared CPU cores, the
    # tiny model training 4 datasets in the same process: a renewal (KV compare-and-set) took
    # p50 0.8 ms, p99 30 ms, max 62 ms; the event loop lagged p99 42 ms, max 51 ms. So 5 s
    # renewals are never late for their own sake, and 15 s leaves two more tries before the
    # holder gives up (10 s) and rides out a NATS restart (the bus reconnects every 1 s), yet
    # hands a dead trainer's model over well before its dataset comes back (ack wait 60 s).
    lease_duration_s: PositiveFloat = 15.0
    lease_renew_s: PositiveFloat = 5.0

    # Retention (services/trainer/retention.py), after every checkpoint and every finished run:
    # each run keeps its newest `keep_last_checkpoints`, the best `keep_best_checkpoints` by the
    # evaluator's score are kept across runs, only the newest `keep_runs` runs keep more than
    # what is protected (0: every run does). Always kept: the current weights and the pending
    # run's latest checkpoint (whole: they are resumed from), the champion and every earlier
    # champion it may roll back to, a staged deployment. Every other kept checkpoint loses its
    # optimizer and RNG state (resume only, never served). Measured: the tiny model, 4 datasets,
    # a checkpoint every 3 steps: 44 checkpoints of 16.1 MB whole (~707 MB kept as they were)
    # left 54.7 MB (8 checkpoints of 5.5 MB, one 10.5 MB optimizer state).
    keep_last_checkpoints: Positive = 2
    keep_best_checkpoints: NonNegative = 3
    keep_runs: NonNegative = 8

    # Below this much free space (GB) on the artifacts' disk the trainer pauses itself (stops at a
    # step boundary before a checkpoint write or a run, releases its dataset, publishes
    # training.paused) and resumes by itself once 10 % more than this is free. A tiny-model
    # checkpoint is ~16 MB whole (~6 MB without optimizer state), a Qwen3-0.6B one ~7 GB whole:
    # 1 GB keeps the NATS store and logs on the same disk alive; set ~2 whole checkpoints for a
    # real model. 0: no floor.
    disk_floor_gb: NonNegativeFloat = 1.0

    def __post_init__(self) -> None:
        if self.lease_renew_s * 3 > self.lease_duration_s:
            raise SettingsError(f"lease_renew_s ({self.lease_renew_s:g}) must be at most a third of lease_duration_s "
                             f"({self.lease_duration_s:g}): a holder must get several tries to renew before it gives up")

    @property
    def disk_floor_bytes(self) -> int:
        return int(self.disk_floor_gb * 1e9)


SETTINGS = TrainerSettings
