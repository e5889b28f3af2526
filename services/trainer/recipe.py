"""Full fine-tuning of a causal LM on one dataset: the training loop, top to bottom.

`FullFinetuneRecipe` trains one dataset (one *run*) from given starting weights:

- `setup()`: pick the device, load the tokenizer and model (from the run's latest checkpoint
  when resuming, else the starting weights); load the dataset's examples from the tokenization
  cache, building it on first use (services/trainer/token_cache.py: rows that cannot train are
  dropped with their reasons); hold out a validation slice; draw the replayed examples of
  earlier datasets from their caches; plan every step (services/trainer/packing.py); build
  AdamW and the learning rate schedule, and on resume restore optimizer, scheduler, RNG states
  and the data position.
- `train()`: one optimizer step per planned step, over its micro-batches (gradient
  accumulation); a checkpoint every `save_every_steps` and at the end, written off the training
  thread (services/trainer/writer.py); validation loss on the held-out slice every
  `validation_every_steps`; before every step the control gate is consulted (pause blocks, stop
  and shutdown checkpoint at the current step and return early).
- `cleanup()`: release the model and optimizer (and the CUDA cache).

Batches are packed by default: examples first-fit into sequences, isolated from each other by
position ids that restart at 0 with no attention mask and no KV cache (libs.common.chat.
collate_packed). Supported: CPU in fp32; CUDA with fp32 weights and bf16 autocast (flash
attention's varlen path when the model was loaded with it); gradient clipping and accumulation;
exact resume (resumed and uninterrupted runs end with equal weights and equal per-step losses on
CPU). Multi-GPU and multi-node: the Ray Train backend runs this recipe on each worker.

The loss is the model's: cross-entropy averaged over every trained token of the step (a token
mean over all its micro-batches, as one big batch's would be; not a mean of per-example means),
on assistant tokens for chat rows and on the whole text for completion rows. Every example has a
trained token (encoding drops a row without one) and every sequence is checked before the
forward pass (`trained_tokens`), so no step ever trains on a silent zero (or undefined) loss.

The recipe knows nothing about the bus: every fact it reports goes through
`emit(subject, event)`, which the service turns into a publication.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import numpy as np
import torch
from tqdm import tqdm

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactStore
from libs.common.chat import IGNORE_INDEX, EncodedChat, collate, collate_packed
from libs.common.events import CheckpointSaved, Event, TrainingProgress, TrainingStarted, derived_id
from libs.common.log import get_logger
from libs.common.models import load_model, load_tokenizer, pick_device
from services.trainer import token_cache
from services.trainer.checkpoints import (
    CheckpointInfo,
    find_training_state,
    is_complete,
    load_training_state,
    read_info,
    remove_staging,
    resumable_checkpoint,
    save_training_state,
    step_dir_name,
    write_checkpoint,
)
from services.trainer.control import ControlGate
from services.trainer.data import (
    DEFAULT_SCHEMA,
    DatasetError,
    Dropped,
    Encoded,
    TrainingPlan,
    encode_row,
    iter_rows,
    replay_count,
    replay_picks,
    validation_split,
)
from services.trainer.disk import check_room
from services.trainer.divergence import DivergenceGuard
from services.trainer.packing import fill_micro_batches
from services.trainer.schedule import continual_multiplier, lr_multiplier
from services.trainer.settings import TrainerSettings
from services.trainer.world import World
from services.trainer.writer import CheckpointWriter, cpu_copy

Emit = Callable[[str, Event], None]
NO_PROFILE = "none"
# Examples a validation forward pass takes at once.
VALIDATION_BATCH = 16


class NoTrainedTokens(DatasetError):
    """A batch (or an example in it) with no token the loss sees: its loss would be zero or NaN."""


def trained_tokens(labels: torch.Tensor) -> int:
    """The tokens the loss sees in a batch of labels; raises if any sequence has none.

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
    # The dataset's row transform (libs.common.profiles; DatasetAccepted.profile).
    profile: str = NO_PROFILE
    # The dataset id and profile of each of `replay_paths` (their tokenization caches' keys);
    # empty: ids are the files' content hashes and no profile.
    replay_ids: tuple[str, ...] = ()
    replay_profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingResult:
    finished: bool  # False: stopped early (stop command, shutdown); resume later
    step: int
    global_step: int
    loss: float
    checkpoint: Artifact | None  # None only when stopped before its first step
    tokens: int = 0  # real (non-padding) tokens the run trained, once it has finished


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward pass: the model's inputs and what they hold."""

    inputs: dict[str, torch.Tensor]  # input_ids, position_ids, labels
    trained_tokens: int  # tokens the loss sees
    real_tokens: int  # non-padding tokens
    computed_tokens: int  # tokens in the tensor, padding included


class FullFinetuneRecipe:
    def __init__(
        self, settings: TrainerSettings, job: TrainingJob, store: ArtifactStore, gate: ControlGate, emit: Emit,
        world: World | None = None,
    ) -> None:
        self.settings = settings
        # The processes training this run together (services/trainer/world.py); the main one
        # alone consults the gate, writes checkpoints and emits events.
        self._world = world or World()
        self.job = job
        self._store = store
        self._gate = gate
        self._emit = emit
        self._log = get_logger("trainer.recipe").bind(run_id=job.run_id, dataset_id=job.dataset_id)
        self._step = 0  # optimizer steps done in this run
        self._loss = float("nan")
        self._val_loss: float | None = None
        self._divergence = DivergenceGuard()
        self._writer = CheckpointWriter()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._device = pick_device(self.settings.device)
        if self._world.is_main:
            remove_staging(self.job.run_dir)
        self._resume_from = resumable_checkpoint(self.job.run_dir)
        weights = self._resume_from or self.job.init_path
        self._tokenizer = load_tokenizer(weights)
        self._setup_data()
        self._setup_model(weights)
        self._setup_optimizer()
        if self._resume_from:
            self._restore(self._resume_from)
        self._log.info(
            "recipe ready", device=self._device, weights=str(weights), schema=self.job.schema, profile=self.job.profile,
            examples=self._plan.num_examples, replayed=self._num_replayed, validation=len(self._validation),
            dropped_rows=len(self._dropped.dropped), total_steps=self._plan.total_steps,
            total_tokens=self._plan.total_tokens, start_step=self._step,
            batching=self.settings.hyperparameters.batching,
        )

    def _examples_of(self, dataset_id: str, path: Path, schema: str, profile: str) -> token_cache.CachedExamples:
        """A dataset's examples from the tokenization cache (tokenized now if not cached yet)."""
        root = self.settings.service_dir("trainer") / "token-cache"
        key = token_cache.cache_key(dataset_id, schema, profile, self.settings.max_length, self._tokenizer_fp)
        transform = _row_transform(profile)

        def rows():
            for index, row in enumerate(iter_rows(path, schema)):
                yield transform(row, index) if transform else row

        started = time.perf_counter()
        cached, built = token_cache.load_or_build(
            root, key, rows, partial(encode_row, tokenizer=self._tokenizer, max_length=self.settings.max_length))
        self._log.info("examples tokenized" if built else "examples from the tokenization cache", dataset_id=dataset_id,
                       examples=len(cached), dropped=len(cached.meta.dropped), cache=key,
                       seconds=round(time.perf_counter() - started, 3))
        return cached

    def _setup_data(self) -> None:
        h, job = self.settings.hyperparameters, self.job
        self._tokenizer_fp = token_cache.tokenizer_fingerprint(self._tokenizer)
        if self._world.is_main:
            remove_staging(self.settings.service_dir("trainer") / "token-cache")
        own = self._main_first(lambda: self._examples_of(job.dataset_id, job.dataset_path, job.schema, job.profile))
        self._dropped = Encoded([], [Dropped(row, reason) for row, reason in own.meta.dropped])
        for reason, count in self._dropped.counts().most_common():
            self._log.warning("rows dropped", count=count, reason=reason,
                              rows=[d.row for d in self._dropped.dropped if d.reason == reason][:20])
        # The dataset's own rows first: if none of them can train, the run fails (a dataset is
        # never "trained" on replayed rows alone).
        if not len(own):
            raise DatasetError(f"none of {own.meta.num_rows} rows can be trained on: "
                               f"{'; '.join(self._dropped.summary(3)) or 'no rows'}")
        train, self._validation = validation_split(len(own), h.validation_fraction, h.validation_max_rows,
                                                   h.validation_min_rows, h.seed, job.dataset_id)
        pools = [own] + self._main_first(self._replay_pools)
        picks = replay_picks([len(p) for p in pools[1:]], replay_count(len(train), h.replay_fraction), h.seed,
                             job.dataset_id)
        self._num_replayed = len(picks)
        self._pools = pools
        # The run's examples as (pool, index in pool): pool 0 is the dataset, 1.. earlier datasets.
        self._refs = np.array([(0, i) for i in train] + [(pool + 1, i) for pool, i in picks], dtype=np.int64)
        pool_lengths = [p.lengths() for p in pools]
        lengths = [int(pool_lengths[pool][i]) for pool, i in self._refs]
        self._lengths = lengths
        self._plan = TrainingPlan(lengths, h.batching_plan(), h.epochs, h.max_steps, h.seed, job.dataset_id,
                                  max_tokens=h.max_tokens)

    def _main_first(self, build):
        """`build()` on the main worker first (it tokenizes and fills the cache), then on the
        others, which find its cache; with one process, just `build()`."""
        if not self._world.is_main:
            self._world.agree(True)
        result = build()
        if self._world.is_main:
            self._world.agree(True)
        return result

    def _replay_pools(self) -> list[token_cache.CachedExamples]:
        job = self.job
        schemas = job.replay_schemas or (DEFAULT_SCHEMA,) * len(job.replay_paths)
        profiles = job.replay_profiles or (NO_PROFILE,) * len(job.replay_paths)
        ids = job.replay_ids or tuple(_content_id(path) for path in job.replay_paths)
        pools = []
        for path, schema, profile, dataset_id in zip(job.replay_paths, schemas, profiles, ids, strict=True):
            try:
                pools.append(self._examples_of(dataset_id, path, schema, profile))
            except DatasetError as exc:  # an earlier dataset that no longer reads: replay the others
                self._log.warning("earlier dataset not replayed", dataset_id=dataset_id, error=str(exc))
        return pools

    def examples(self, indices: list[int]) -> list[EncodedChat]:
        """The run's examples `indices` (into the plan's index space), read from their caches."""
        by_pool: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(indices):
            pool, row = self._refs[index]
            by_pool.setdefault(int(pool), []).append((position, int(row)))
        found: list[EncodedChat | None] = [None] * len(indices)
        for pool, wanted in by_pool.items():
            for (position, _), example in zip(wanted, self._pools[pool].examples([row for _, row in wanted]), strict=True):
                found[position] = example
        return found

    def _setup_model(self, weights: Path) -> None:
        # Loaded in fp32 and then moved: on CUDA the weights (and AdamW moments) stay fp32
        # and only the forward pass runs in bf16 (autocast), so small updates are not lost.
        on_cuda = self._device.startswith("cuda")
        self._model = load_model(weights, "cpu", for_training=True,
                                 attn_implementation=training_attention(on_cuda)).to(self._device)
        self._autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()

    def _setup_optimizer(self) -> None:
        h = self.settings.hyperparameters
        self._optimizer = torch.optim.AdamW(self._model.parameters(), lr=h.learning_rate, weight_decay=h.weight_decay)
        if h.policy == "continual":
            carried = find_training_state(self.job.init_path)
            if not self._resume_from and carried is not None:
                # The moments the starting weights were trained with: AdamW goes on, it does not
                # restart from zero (and re-learn its step sizes) on every small dataset.
                self._optimizer.load_state_dict(load_training_state(carried)["optimizer"])
                for group in self._optimizer.param_groups:
                    group["lr"] = group["initial_lr"] = h.learning_rate
            base = self.job.base_global_step

            def schedule(step: int) -> float:
                return continual_multiplier(base + step, h.warmup_steps, step, self._plan.total_steps)
        else:
            schedule = partial(lr_multiplier, warmup_steps=h.warmup_steps, total_steps=self._plan.total_steps)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, schedule)

    def _restore(self, checkpoint: Path) -> None:
        state = load_training_state(find_training_state(checkpoint))
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
        self._val_loss = state.get("val_loss")
        if (state["epoch"], state["batch_index"]) != self._plan.position(self._step):
            raise RuntimeError(f"checkpoint {checkpoint}: data position does not match step {self._step}")

    # ------------------------------------------------------------------ train

    def train(self) -> TrainingResult:
        job, plan, s = self.job, self._plan, self.settings
        emit = self._emit if self._world.is_main else _ignore
        emit(topology.TRAINING_STARTED, TrainingStarted(
            run_id=job.run_id, dataset_id=job.dataset_id, init_weights=job.init_weights,
            total_steps=plan.total_steps, start_step=self._step, global_step=self._global_step,
            num_examples=plan.num_examples, num_replayed=self._num_replayed,
            num_rows_dropped=len(self._dropped.dropped), dropped_reasons=self._dropped.summary(),
        ))
        bar = tqdm(total=plan.total_steps, initial=self._step, desc=job.run_id,
                   disable=not sys.stderr.isatty() or not self._world.is_main)
        window = _Window()
        # Seconds per step, over the last steps trained (checkpoint and validation pauses left
        # out): what the ETA is computed from.
        recent: deque[float] = deque(maxlen=50)
        try:
            while self._step < plan.total_steps:
                if not self._world.agree(self._gate.proceed() if self._world.is_main else True):
                    return self._stop_early()
                step_started = time.perf_counter()
                micro_batches = self.micro_batches(self._step)
                lr = self._scheduler.get_last_lr()[0]
                self._loss, grad_norm = self._train_step(micro_batches)
                self._step += 1
                recent.append(time.perf_counter() - step_started)
                window.add(self._loss, grad_norm, self._step_real_tokens)
                bar.update(1)
                bar.set_postfix(loss=f"{self._loss:.4f}")

                # Validating and saving are not training: their time stays out of tokens/s.
                pause_started = time.perf_counter()
                if self._world.is_main and self._validation and (
                        self._step % s.validation_every_steps == 0 or self._step == plan.total_steps):
                    self._val_loss = self.validation_loss()
                if self._step % s.save_every_steps == 0 and self._step < plan.total_steps:
                    self._save(final=False)
                window.exclude(time.perf_counter() - pause_started)
                if self._world.is_main and (window.steps >= s.progress_every_steps or window.elapsed >= s.progress_every_s
                                            or self._step == plan.total_steps):
                    self._report_progress(lr, window, recent)
                    window = _Window()
        finally:
            bar.close()
        checkpoint = self._save(final=True)
        return TrainingResult(True, self._step, self._global_step, self._loss, checkpoint, self._plan.total_tokens)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This worker's micro-batches of step `step` + 1, as tensors on the device.

        One process computes the step as planned. With N workers, sequence j of the step goes to
        worker j % N, regrouped into micro-batches under the same budget; a worker's share may be
        empty (it adds zero gradients).
        """
        pad_id = self._tokenizer.pad_token_id
        planned = self._plan.step(step)
        if self._world.size > 1:
            planned = self._share_of_step(planned)
        batches = []
        for sequences in planned:
            examples = [self.examples(sequence) for sequence in sequences]
            inputs = collate_packed(examples, pad_id)
            batches.append(MicroBatch(
                inputs={name: tensor.to(self._device) for name, tensor in inputs.items()},
                trained_tokens=trained_tokens(inputs["labels"]),  # raises before a batch trains on zero loss
                real_tokens=sum(len(e.input_ids) for sequence in examples for e in sequence),
                computed_tokens=inputs["input_ids"].numel(),
            ))
        return batches

    def _share_of_step(self, planned: list[list[list[int]]]) -> list[list[list[int]]]:
        h = self.settings.hyperparameters
        mine = [sequence for micro in planned for sequence in micro][self._world.rank::self._world.size]
        if h.batching == "padded":
            return [mine[start:start + h.batch_size] for start in range(0, len(mine), h.batch_size)]
        lengths = [sum(int(self._lengths[i]) for i in sequence) for sequence in mine]
        return [[mine[p] for p in group] for group in fill_micro_batches(lengths, h.batch_tokens)]

    def _train_step(self, micro_batches: list[MicroBatch]) -> tuple[float, float]:
        """One optimizer step over its micro-batches; returns the step's loss and gradient norm."""
        local_trained = sum(m.trained_tokens for m in micro_batches)
        local_real = sum(m.real_tokens for m in micro_batches)
        step_tokens, step_real = self._world.all_sum([local_trained, local_real])
        self._step_real_tokens = int(step_real)
        loss_sum = 0.0
        for micro in micro_batches:
            with self._autocast:
                loss = self._model(**micro.inputs, use_cache=False).loss
            # The model's loss is the micro-batch's token mean: weighted by its share of the
            # step's trained tokens, the gradients add up to the whole step's token mean.
            (loss * (micro.trained_tokens / step_tokens)).backward()
            loss_sum += loss.item() * micro.trained_tokens
        self._world.reduce_gradients(list(self._model.parameters()))
        (loss_sum,) = self._world.all_sum([loss_sum])
        grad_clip = self.settings.hyperparameters.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._model.parameters(), grad_clip or math.inf))
        step_loss = loss_sum / step_tokens
        # Checked before the step: a non-finite update would poison the weights for good.
        self._divergence.check(self._step + 1, step_loss, grad_norm if grad_clip else None)
        self._optimizer.step()
        self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Token-mean loss over the held-out slice (never trained on), the current weights."""
        self._model.eval()
        try:
            total, tokens = 0.0, 0
            own = self._pools[0]
            for start in range(0, len(self._validation), VALIDATION_BATCH):
                batch = collate(own.examples(self._validation[start:start + VALIDATION_BATCH]),
                                self._tokenizer.pad_token_id, self._device)
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                with self._autocast:
                    loss = self._model(**batch, use_cache=False).loss
                total += loss.item() * count
                tokens += count
            return total / tokens
        finally:
            self._model.train()

    def _report_progress(self, lr: float, window: _Window, recent: deque[float]) -> None:
        remaining = self._plan.total_steps - self._step
        eta = round(remaining * sorted(recent)[len(recent) // 2], 1) if recent else None
        gap = None if self._val_loss is None else round(self._val_loss - window.mean_loss, 4)
        event = TrainingProgress(
            run_id=self.job.run_id, dataset_id=self.job.dataset_id, step=self._step,
            total_steps=self._plan.total_steps, global_step=self._global_step, loss=window.mean_loss,
            learning_rate=lr, tokens_per_second=round(window.tokens_per_second, 1),
            epoch=round(self._plan.epoch_progress(self._step), 4), grad_norm=round(window.mean_grad_norm, 4),
            val_loss=self._val_loss, train_val_gap=gap, eta_s=eta,
        )
        self._log.info("training progress", step=event.step, total_steps=event.total_steps, epoch=event.epoch,
                       loss=round(event.loss, 4), val_loss=event.val_loss, grad_norm=event.grad_norm,
                       learning_rate=lr, tokens_per_second=event.tokens_per_second, eta_s=eta)
        self._emit(topology.TRAINING_PROGRESS, event)

    def _stop_early(self) -> TrainingResult:
        if self._gate.skip_requested:  # given up for good: nothing will resume from a checkpoint
            self._log.info("run skipped", step=self._step)
            return TrainingResult(False, self._step, self._global_step, self._loss, None)
        if abandoned := self._gate.abandoned:  # not this trainer's to write any more
            self._log.warning("run abandoned without a checkpoint", step=self._step, reason=abandoned)
            return TrainingResult(False, self._step, self._global_step, self._loss, None)
        checkpoint = self._save(final=False, wait=True) if self._step else None
        self._log.info("run stopped early; dataset will resume from this step", step=self._step)
        return TrainingResult(False, self._step, self._global_step, self._loss, checkpoint)

    @property
    def _global_step(self) -> int:
        return self.job.base_global_step + self._step

    # ------------------------------------------------------------------ checkpoints

    def _save(self, *, final: bool, wait: bool | None = None) -> Artifact | None:
        """Checkpoint the current step (once per step) and announce it.

        The state is copied at this step, then written on the writer thread while training goes
        on; the final checkpoint (and one a stop asks for) is waited for and returned.
        """
        job = self.job
        if not self._world.is_main:  # the main worker writes; every worker holds the same state
            return None
        target = self._store.location("checkpoints", job.run_id, step_dir_name(self._global_step))
        # Raises DiskFull below the floor: the run stops here, at a step boundary, writing nothing.
        check_room(self._store.location("checkpoints", self.job.run_id), self.settings.disk_floor_bytes,
                   f"checkpoint of step {self._step}")
        info = CheckpointInfo(
            run_id=job.run_id, step=self._step, global_step=self._global_step, total_steps=self._plan.total_steps,
            dataset_id=job.dataset_id, init_weights=job.init_weights, final=final, loss=self._loss,
            profile=job.profile,
        )
        started = time.perf_counter()
        weights = cpu_copy(self._model.state_dict())
        training_state = cpu_copy(self._training_state())
        step = self._step
        model, tokenizer = self._model, self._tokenizer

        def fill(staging: Path) -> None:
            model.save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)

        def write() -> Artifact:
            sealed = None
            if not is_complete(target):
                # Beside the checkpoint, before it: a complete checkpoint always has its state
                # until retention drops it, and the announced hash never covers it.
                state_sha = save_training_state(target, training_state)
                sealed = write_checkpoint(target, msgspec.structs.replace(info, training_state_sha256=state_sha), fill)
            saved_final = final
            if sealed is None:
                # Saved by an earlier attempt; the announcement below has the same event id.
                saved_final = read_info(target).final
                artifact = self._store.describe_dir(target)
            else:
                artifact = Artifact(uri=self._store.uri_for(target), sha256=sealed.sha256, size=sealed.size)
            self._log.info("checkpoint saved", step=step, global_step=info.global_step, uri=artifact.uri,
                           final=saved_final, write_s=round(time.perf_counter() - started, 3))
            self._emit(topology.CHECKPOINT_SAVED, CheckpointSaved(
                id=event_id("checkpoint", job.run_id, step), run_id=job.run_id, step=step,
                global_step=info.global_step, dataset_id=job.dataset_id, uri=artifact.uri, sha256=artifact.sha256,
                final=saved_final, profile=job.profile,
            ))
            return artifact

        self._writer.submit(write)
        self._log.debug("checkpoint snapshot taken", step=step, blocked_ms=round((time.perf_counter() - started) * 1e3, 1))
        if final or wait:
            return self._writer.wait()
        return None

    def _training_state(self) -> dict:
        epoch, batch_index = self._plan.position(self._step)
        return {
            "step": self._step,
            "global_step": self._global_step,
            "total_steps": self._plan.total_steps,
            "num_examples": self._plan.num_examples,
            "epoch": epoch,  # the position of the next step to train on
            "batch_index": batch_index,
            "loss": self._loss,
            "val_loss": self._val_loss,
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        # A write in flight finishes (its checkpoint is complete or never announced) before the
        # references go, so the memory is free before the next dataset's run.
        try:
            self._writer.close()
        finally:
            self._model = self._optimizer = self._scheduler = None
            self._pools, self._refs = [], None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class _Window:
    """Steps since the last progress event: their mean loss and grad norm, and tokens/s."""

    def __init__(self) -> None:
        self.steps, self.tokens, self._loss, self._grad, self._excluded = 0, 0, 0.0, 0.0, 0.0
        self._started = time.perf_counter()

    def add(self, loss: float, grad_norm: float, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self._loss += loss
        self._grad += grad_norm

    def exclude(self, seconds: float) -> None:
        """Leave a pause that was not training (validation, a checkpoint snapshot) out of the clock."""
        self._excluded += seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started - self._excluded

    @property
    def mean_loss(self) -> float:
        return self._loss / self.steps if self.steps else float("nan")

    @property
    def mean_grad_norm(self) -> float:
        return self._grad / self.steps if self.steps else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


def training_attention(on_cuda: bool) -> str | None:
    """flash_attention_2 on CUDA where the flash-attn package is installed: its varlen kernels
    isolate packed rows by their position ids without building a mask; otherwise transformers'
    default (sdpa), which masks packed rows block-diagonally."""
    if not on_cuda:
        return None
    import importlib.util  # noqa: PLC0415

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else None


def _ignore(subject: str, event: Event) -> None:
    """Where a worker other than the main one sends its events: nowhere (the main one reports)."""


def _row_transform(profile: str):
    """The profile's row transform (libs.common.profiles), or None for no profile."""
    if profile == NO_PROFILE:
        return None
    from libs.common.profiles import get_profile  # noqa: PLC0415

    return get_profile(profile).transform


def _content_id(path: Path) -> str:
    from libs.common.artifacts import sha256_file  # noqa: PLC0415

    return sha256_file(path)
