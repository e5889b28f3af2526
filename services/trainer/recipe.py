"""Full fine-tuning of a causal LM on one dataset: the training loop, top to bottom.

`FullFinetuneRecipe` trains one dataset (one *run*) from given starting weights:

- `setup()`: pick the device, load the tokenizer and model (from the run's latest checkpoint
  when resuming, else the starting weights), tokenize the dataset as its schema says (rows
  that cannot train are dropped with their reasons, services/trainer/data.py), build AdamW and the
  warmup + cosine schedule, and on resume restore optimizer, scheduler, RNG states and the
  data position.
- `train()`: one optimizer step per batch; a checkpoint every `save_every_steps` and at the
  end; before every step the control gate is consulted (pause blocks, stop and shutdown
  checkpoint at the current step and return early).
- `cleanup()`: release the model and optimizer (and the CUDA cache).

Supported: CPU in fp32; CUDA with fp32 weights and bf16 autocast; gradient clipping; exact
resume (resumed and uninterrupted runs end with equal weights on CPU). Not supported here:
gradient accumulation, multi-GPU (Ray Train is the scale-out path).

The loss is the model's: cross-entropy averaged over every trained token of the batch (a
token mean across the batch, not a mean of per-example means), on assistant tokens for chat
rows and on the whole text for completion rows. Every example of a batch must have a trained
token: `trained_tokens` raises before the forward pass otherwise, so no batch ever trains
on a silent zero (or undefined) loss.

The recipe knows nothing about the bus: every fact it reports goes through
`emit(subject, event)`, which the service turns into a publication.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactStore
from libs.common.chat import IGNORE_INDEX, collate
from libs.common.events import CheckpointSaved, Event, TrainingProgress, TrainingStarted, derived_id
from libs.common.log import get_logger
from libs.common.models import load_model, load_tokenizer, pick_device
from services.trainer.checkpoints import (
    TRAINING_STATE_FILE,
    CheckpointInfo,
    latest_checkpoint,
    load_training_state,
    read_info,
    remove_staging,
    save_training_state,
    step_dir_name,
    write_checkpoint,
)
from services.trainer.control import ControlGate
from services.trainer.data import (
    DEFAULT_SCHEMA,
    DatasetError,
    Encoded,
    TrainingPlan,
    encode_rows,
    epoch_order,
    read_rows,
    replay_count,
    replay_rows,
)
from services.trainer.divergence import DivergenceGuard
from services.trainer.schedule import continual_multiplier, lr_multiplier
from services.trainer.settings import TrainerSettings

Emit = Callable[[str, Event], None]


class NoTrainedTokens(DatasetError):
    """A batch (or an example in it) with no token the loss sees: its loss would be zero or NaN."""


def trained_tokens(labels: torch.Tensor) -> int:
    """The tokens the loss sees in a batch of labels; raises if any example has none.

    The causal LM predicts token t+1 from tokens up to t, so the first label of a row is never
    seen: counted on the shifted labels, as the loss counts them.
    """
    per_example = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if labels.shape[0] == 0 or not bool((per_example > 0).all()):
        empty = [i for i, n in enumerate(per_example.tolist()) if n == 0]
        raise NoTrainedTokens(f"batch of {labels.shape[0]} examples: examples {empty} have no trained token; "
                              "refusing to train on a zero loss")
    return int(per_example.sum())


def event_id(*key: object) -> str:
    """A deterministic event id: JetStream drops the same fact published twice."""
    return derived_id("trainer", *key)


@dataclass(frozen=True)
class TrainingJob:
    run_id: str
    dataset_id: str
    dataset_path: Path
    init_weights: str  # identity (URI) of the weights the run starts from
    init_path: Path  # where those weights are on disk
    run_dir: Path  # checkpoints/<run_id> in the artifact store
    base_global_step: int  # the trainer's global step before this run
    # Earlier datasets replay draws from (the most recent last); empty: no replay.
    replay_paths: tuple[Path, ...] = ()
    # The dataset's schema (DatasetAccepted.schema): how its rows are read and trained.
    schema: str = DEFAULT_SCHEMA
    # The schema of each of `replay_paths`; empty: all chat_sft_v1.
    replay_schemas: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingResult:
    finished: bool  # False: stopped early (stop command, shutdown); resume later
    step: int
    global_step: int
    loss: float
    checkpoint: Artifact | None  # None only when stopped before its first step


class FullFinetuneRecipe:
    def __init__(
        self, settings: TrainerSettings, job: TrainingJob, store: ArtifactStore, gate: ControlGate, emit: Emit,
    ) -> None:
        self.settings = settings
        self.job = job
        self._store = store
        self._gate = gate
        self._emit = emit
        self._log = get_logger("trainer.recipe").bind(run_id=job.run_id, dataset_id=job.dataset_id)
        self._step = 0  # optimizer steps done in this run
        self._loss = float("nan")
        self._divergence = DivergenceGuard()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._device = pick_device(self.settings.device)
        remove_staging(self.job.run_dir)
        self._resume_from = latest_checkpoint(self.job.run_dir)
        weights = self._resume_from or self.job.init_path
        self._tokenizer = load_tokenizer(weights)
        self._setup_data()
        self._setup_model(weights)
        self._setup_optimizer()
        if self._resume_from:
            self._restore(self._resume_from)
        self._log.info(
            "recipe ready", device=self._device, weights=str(weights), schema=self.job.schema,
            examples=self._plan.num_examples, replayed=self._num_replayed, dropped_rows=len(self._encoded.dropped),
            total_steps=self._plan.total_steps, start_step=self._step,
        )

    def _setup_data(self) -> None:
        h = self.settings.hyperparameters
        rows = read_rows(self.job.dataset_path, self.job.schema)
        replayed = replay_rows(list(self.job.replay_paths), replay_count(len(rows), h.replay_fraction), h.seed,
                               self.job.dataset_id, self.job.replay_schemas)
        # The dataset's own rows first: if none of them can train, the run fails (a dataset is
        # never "trained" on replayed rows alone).
        self._encoded: Encoded = encode_rows(rows, self._tokenizer, self.settings.max_length)
        for reason, count in self._encoded.counts().most_common():
            self._log.warning("rows dropped", count=count, reason=reason,
                              rows=[d.row for d in self._encoded.dropped if d.reason == reason][:20])
        try:
            kept_replayed = encode_rows(replayed, self._tokenizer, self.settings.max_length).examples if replayed else []
        except DatasetError:  # every replayed row dropped: the run trains on its own rows
            kept_replayed = []
        if len(kept_replayed) < len(replayed):
            self._log.warning("replayed rows dropped", count=len(replayed) - len(kept_replayed))
        self._num_replayed = len(kept_replayed)
        self._examples = self._encoded.examples + kept_replayed
        self._plan = TrainingPlan(len(self._examples), h.batch_size, h.epochs, h.max_steps)

    def _setup_model(self, weights: Path) -> None:
        # Loaded in fp32 and then moved: on CUDA the weights (and AdamW moments) stay fp32
        # and only the forward pass runs in bf16 (autocast), so small updates are not lost.
        self._model = load_model(weights, "cpu", for_training=True).to(self._device)
        on_cuda = self._device.startswith("cuda")
        self._autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()

    def _setup_optimizer(self) -> None:
        h = self.settings.hyperparameters
        self._optimizer = torch.optim.AdamW(self._model.parameters(), lr=h.learning_rate, weight_decay=h.weight_decay)
        if h.policy == "continual":
            carried = self.job.init_path / TRAINING_STATE_FILE
            if not self._resume_from and carried.is_file():
                # The moments the starting weights were trained with: AdamW goes on, it does not
                # restart from zero (and re-learn its step sizes) on every small dataset.
                self._optimizer.load_state_dict(load_training_state(self.job.init_path)["optimizer"])
                for group in self._optimizer.param_groups:
                    group["lr"] = group["initial_lr"] = h.learning_rate
            base = self.job.base_global_step

            def schedule(step: int) -> float:
                return continual_multiplier(base + step, h.warmup_steps, step, self._plan.total_steps)
        else:
            schedule = partial(lr_multiplier, warmup_steps=h.warmup_steps, total_steps=self._plan.total_steps)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, schedule)

    def _restore(self, checkpoint: Path) -> None:
        state = load_training_state(checkpoint)
        if state["total_steps"] != self._plan.total_steps or state["num_examples"] != self._plan.num_examples:
            raise RuntimeError(
                f"checkpoint {checkpoint} was planned for {state['total_steps']} steps over "
                f"{state['num_examples']} examples, this run plans {self._plan.total_steps} over "
                f"{self._plan.num_examples}"
            )
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self._step, self._loss = state["step"], state["loss"]
        if (state["epoch"], state["batch_index"]) != self._plan.position(self._step):
            raise RuntimeError(f"checkpoint {checkpoint}: data position does not match step {self._step}")

    # ------------------------------------------------------------------ train

    def train(self) -> TrainingResult:
        job, plan, s = self.job, self._plan, self.settings
        self._emit(topology.TRAINING_STARTED, TrainingStarted(
            run_id=job.run_id, dataset_id=job.dataset_id, init_weights=job.init_weights,
            total_steps=plan.total_steps, start_step=self._step, global_step=self._global_step,
            num_examples=plan.num_examples, num_replayed=self._num_replayed,
            num_rows_dropped=len(self._encoded.dropped), dropped_reasons=self._encoded.summary(),
        ))
        bar = tqdm(total=plan.total_steps, initial=self._step, desc=job.run_id, disable=not sys.stderr.isatty())
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        order_epoch, order = -1, []
        try:
            while self._step < plan.total_steps:
                if not self._gate.proceed():
                    return self._stop_early()
                epoch, batch_index = plan.position(self._step)
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(plan.num_examples, s.hyperparameters.seed, job.dataset_id, epoch)
                examples = [self._examples[i] for i in plan.batch(order, batch_index)]
                batch = collate(examples, self._tokenizer.pad_token_id)
                lr = self._scheduler.get_last_lr()[0]
                self._loss, tokens = self._train_step(batch)
                self._step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self._loss:.4f}")

                window_steps, window_tokens = window_steps + 1, window_tokens + tokens
                elapsed = time.perf_counter() - window_start
                if window_steps >= s.progress_every_steps or elapsed >= s.progress_every_s:
                    self._report_progress(lr, window_tokens / elapsed)
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                if self._step % s.save_every_steps == 0 and self._step < plan.total_steps:
                    self._save(final=False)
                    # Saving is not training: keep it out of the tokens/s figure.
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        finally:
            bar.close()
        checkpoint = self._save(final=True)
        return TrainingResult(True, self._step, self._global_step, self._loss, checkpoint)

    def _train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """One optimizer step; returns the batch loss and its number of real (non-pad) tokens."""
        trained_tokens(batch["labels"])  # raises before a batch could train on a zero loss
        batch = {name: tensor.to(self._device) for name, tensor in batch.items()}
        with self._autocast:
            loss = self._model(**batch).loss
        loss.backward()
        grad_norm = None
        if grad_clip := self.settings.hyperparameters.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._model.parameters(), grad_clip))
        # Checked before the step: a non-finite update would poison the weights for good.
        self._divergence.check(self._step + 1, loss.item(), grad_norm)
        self._optimizer.step()
        self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)
        return loss.item(), int(batch["attention_mask"].sum())

    def _report_progress(self, lr: float, tokens_per_second: float) -> None:
        event = TrainingProgress(
            run_id=self.job.run_id, dataset_id=self.job.dataset_id, step=self._step,
            total_steps=self._plan.total_steps, global_step=self._global_step, loss=self._loss,
            learning_rate=lr, tokens_per_second=round(tokens_per_second, 1),
        )
        self._log.info("training progress", step=event.step, total_steps=event.total_steps, loss=round(self._loss, 4),
                       learning_rate=lr, tokens_per_second=event.tokens_per_second)
        self._emit(topology.TRAINING_PROGRESS, event)

    def _stop_early(self) -> TrainingResult:
        checkpoint = self._save(final=False) if self._step else None
        self._log.info("run stopped early; dataset will resume from this step", step=self._step)
        return TrainingResult(False, self._step, self._global_step, self._loss, checkpoint)

    @property
    def _global_step(self) -> int:
        return self.job.base_global_step + self._step

    # ------------------------------------------------------------------ checkpoints

    def _save(self, *, final: bool) -> Artifact:
        """Checkpoint the current step (once per step) and announce it."""
        job = self.job
        target = self._store.location("checkpoints", job.run_id, step_dir_name(self._global_step))
        info = CheckpointInfo(
            run_id=job.run_id, step=self._step, global_step=self._global_step, total_steps=self._plan.total_steps,
            dataset_id=job.dataset_id, init_weights=job.init_weights, final=final, loss=self._loss,
        )

        def fill(staging: Path) -> None:
            self._model.save_pretrained(staging)
            self._tokenizer.save_pretrained(staging)
            save_training_state(staging, self._training_state())

        if not write_checkpoint(target, info, fill):
            # Saved by an earlier attempt; the announcement below has the same event id.
            final = read_info(target).final
        artifact = self._store.describe_dir(target)
        self._log.info("checkpoint saved", step=self._step, global_step=self._global_step, uri=artifact.uri,
                       final=final)
        self._emit(topology.CHECKPOINT_SAVED, CheckpointSaved(
            id=event_id("checkpoint", job.run_id, self._step), run_id=job.run_id, step=self._step,
            global_step=self._global_step, dataset_id=job.dataset_id, uri=artifact.uri, sha256=artifact.sha256,
            final=final,
        ))
        return artifact

    def _training_state(self) -> dict:
        epoch, batch_index = self._plan.position(self._step)
        return {
            "step": self._step,
            "global_step": self._global_step,
            "total_steps": self._plan.total_steps,
            "num_examples": self._plan.num_examples,
            "epoch": epoch,  # the position of the next batch to train on
            "batch_index": batch_index,
            "loss": self._loss,
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        # Drop the references so the memory is free before the next dataset's run.
        self._model = self._optimizer = self._scheduler = None
        self._examples = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
