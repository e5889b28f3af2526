"""The trainer service: fine-tunes the current weights on each accepted dataset, one at a time.

Consumes `dataset.accepted.{high,normal,low}` (durables trainer-high/-normal/-low, drained in
that order) and answers core-NATS requests on `control.trainer.<pause|resume|stop|skip>`.
Publishes training.started / progress / finished / failed / paused and checkpoint.saved.

One trainer trains a base model at a time: the one holding the model's lease in KV
(services/trainer/lease.py). Any other trainer of the same model is a hot standby: ready,
`/status` says "standby" and who holds the lease, it takes no dataset, and it takes over when
the lease is released (the holder stopped: SIGTERM releases it at once) or expires (the holder
died). A holder that loses its lease (cut off from NATS longer than the lease) stops its run at
the next step and releases the message, writing nothing: no checkpoint, no state.

Every schema the gatekeeper accepts trains, read as `DatasetAccepted.schema` names it (chat
rows: loss on assistant tokens; completion_v1: loss on the whole text). Rows that cannot train
are dropped with their reasons (on training.started and `/status`); a dataset with none left,
or of a schema the trainer does not know, fails for good and is dead-lettered with the reason.

A dataset's message is a lease, kept alive by the bus's heartbeats while the recipe runs in a
worker thread (the event loop stays free). It is acked only once the run's final checkpoint
is on disk, training.finished is published and the trainer's state (KV, services/trainer/
state.py) names the new weights. A stop command or SIGTERM checkpoints the current step and
releases the message: its redelivery resumes the same run exactly. A dataset already finished
is acked untouched. Every artifact is read through `ArtifactStore.fetch` (its hash checked; from
another host's copy when hosts share no disk).

A run is recorded as pending in the trainer's state before its first step. Until it finishes,
fails for good or is skipped, any other dataset delivered is released again (`Interrupted`, a
delay, not a failure): after a stop, a crash or a kill -9 the interrupted dataset resumes its
own run (same run id, from its last checkpoint) before anything else changes the weights. A
pending run whose message is gone for good (settled, dead-lettered, expired) is given up, not
waited for. Interruptions never count against `max_deliver`; only failures do (the bus counts them).

`skip` (with a reason) ends the current run at once: its dataset is acked, announced as a
training.failed that will not be retried, saying who skipped it and why, and never recorded as
trained.

Disk: retention (services/trainer/retention.py, applied by prune.py) runs after every checkpoint
and every finished run; below the disk floor (services/trainer/disk.py) the trainer pauses
itself with a training.paused event and takes work again once there is room.

Run: `python -m services.trainer` (settings: services/trainer/settings.py).
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from functools import partial
from pathlib import Path

import msgspec
import transformers

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore, sha256_dir
from libs.common.bus import Bus, Delivery, Interrupted, Reject, first_of
from libs.common.events import (
    CheckpointSaved,
    ControlReply,
    ControlTraining,
    DatasetAccepted,
    Event,
    TrainingFailed,
    TrainingFinished,
    TrainingPaused,
    TrainingProgress,
    TrainingStarted,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.records import (
    CHAMPION,
    DEPLOYMENT,
    TRAINER_CONTROL,
    TrainerControl,
    trainer_finished,
    trainer_lease,
    trainer_state,
)
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Reply, Service, Subscribe
from services.trainer import backend, state
from services.trainer.api import router
from services.trainer.checkpoints import resumable_checkpoint, run_id_for
from services.trainer.control import Action, ControlGate, Mode, Skip, decide
from services.trainer.data import DatasetError
from services.trainer.disk import DiskFull, check_room, free_bytes, room_again
from services.trainer.divergence import Diverged
from services.trainer.lease import Lease, holder_id
from services.trainer.prune import Pruner
from services.trainer.recipe import TrainingJob, TrainingResult, event_id
from services.trainer.settings import TrainerSettings
from services.trainer.state import (
    STATE_FILE,
    PendingRun,
    StaleState,
    StateRecord,
    TrainerState,
    record_finished,
    stale_pending,
    with_pending,
)
from services.trainer.status import RunStatus, describe_state

NAME = "trainer"
log = get_logger(NAME)
# How long another dataset waits, released, before it is offered again while a run is pending:
# its turn comes once the pending run's dataset is redelivered (at once after a stop; after the
# ack wait after a crash) and trained.
RELEASE_DELAY_S = 5.0
# How often a trainer paused by the disk floor looks whether there is room again.
DISK_CHECK_S = 5.0
# A standby answers `skip` this much later than the holder would: the holder's answer (the one
# that knows the run) reaches the requester first; the standby's only when no holder answers.
STANDBY_SKIP_REPLY_DELAY_S = 1.0


def model_identity(base_model: Path) -> str:
    """The base model's identity for its state and lease: its directory hash (the same weights
    are the same model wherever they lie), shortened. Hashing Qwen3-0.6B's 1.2 GB takes ~2 s."""
    return sha256_dir(base_model)[:16]


class TrainerService:
    def __init__(self, settings: TrainerSettings, bus: Bus, metrics: ServiceMetrics, store: ArtifactStore,
                 control: Record[TrainerControl], base_model: Path, states: StateRecord, lease: Lease,
                 pruner: Pruner, mode: Mode = "running", base_identity: str = "") -> None:
        self.settings = settings
        # What a run from the base model names as its starting weights (and its run id derives
        # from): the base model's content, so a trainer on another host computes the same run id.
        self.base_weights = base_identity or f"base-model:{model_identity(base_model)}"
        self.bus = bus
        self.store = store
        self.control_record = control
        self.base_model = base_model
        self.states = states
        self.lease = lease
        self.pruner = pruner
        self.gate = ControlGate()
        self.run_status = RunStatus()
        self._datasets = metrics.counter("flywheel_trainer_datasets_total", "Datasets handled", ("outcome",))
        # Set while the mode is `running`, this trainer holds the lease and the disk has room:
        # the subscription takes new datasets only then.
        self.work_allowed = asyncio.Event()
        # Set while no dataset handler runs (the lease is kept until the last one ends).
        self.idle = asyncio.Event()
        self.idle.set()
        # Why the trainer paused itself for disk space (None: it did not).
        self.disk_full: DiskFull | None = None
        self._loop = asyncio.get_running_loop()
        self._apply_mode(mode)

    @property
    def state(self) -> TrainerState:
        return self.states.state

    @classmethod
    async def open(cls, rt: ServiceRuntime[TrainerSettings]) -> TrainerService:
        """Resolve the base model, migrate an old state file, and take the model's lease or stand by."""
        # HF's own tqdm bars (loading, saving shards) would interleave with the JSON log lines.
        transformers.utils.logging.disable_progress_bar()
        settings, bus = rt.settings, rt.bus
        base_model = await asyncio.to_thread(ensure_base_model, settings.data_dir, settings.base_model)
        model = await asyncio.to_thread(model_identity, base_model)
        control = await bus.record(TRAINER_CONTROL)
        states = await state.bind(bus, trainer_state(model), partial(trainer_finished, model))
        await states.migrate(settings.service_dir(NAME) / STATE_FILE)
        lease = Lease(await bus.record(trainer_lease(model)), holder_id(),
                      duration_s=settings.lease_duration_s, renew_s=settings.lease_renew_s)
        pruner = Pruner(settings, rt.store, bus, await bus.record(CHAMPION), await bus.record(DEPLOYMENT))
        persisted, _ = await control.read()
        service = cls(settings, bus, rt.metrics, rt.store, control, base_model, states, lease, pruner,
                      persisted.mode if persisted else "running", base_identity=f"base-model:{model}")
        if await lease.try_acquire():
            await service._take_over()
        else:
            holder = lease.seen
            log.info("standing by: another trainer holds this model", model=model,
                     holder=holder.holder if holder else None, base_model=str(base_model))
        return service

    def interrupt(self) -> None:
        """The process is stopping: the current run checkpoints and releases its dataset."""
        self.gate.shut_down()

    async def close(self) -> None:
        """After the last handler: let the lease go, so a standby takes over at once."""
        if self.lease.holding:
            await self.lease.release()
            log.info("lease released")

    # ------------------------------------------------------------------ the lease

    async def _take_over(self) -> None:
        """This trainer holds the lease now: read the state afresh and fence off any older writer."""
        current = await self.states.load()
        fenced = msgspec.structs.replace(current, holder=self.lease.me)
        if stale := stale_pending(fenced):
            log.warning("pending run record names a dataset already trained; cleared", run_id=stale.run_id,
                        dataset_id=stale.dataset_id)
            fenced = with_pending(fenced, None)
        try:
            await self.states.save(fenced)
        except StaleState as exc:
            await self._lose_lease(str(exc))
            return
        persisted, _ = await self.control_record.read()
        self._apply_mode(persisted.mode if persisted else self.gate.mode)
        pending = self.state.pending
        log.info("holding the model's lease: training", base_model=str(self.base_model), mode=self.gate.mode,
                 current_weights=self.state.current_weights or "base", global_step=self.state.global_step,
                 pending_run=pending.run_id if pending else None, previous_holder=current.holder or None)
        await self._prune(fresh=True)

    async def _lose_lease(self, reason: str) -> None:
        self.lease.holding = False
        self.gate.abandon(f"lease lost: {reason}")
        self._update_valve()
        log.error("lease lost: the current run stops at its next step writing nothing; standing by", reason=reason)

    async def keep_lease(self, stop: asyncio.Event) -> None:
        """Renew the lease while holding it, else watch it and take it over when it is free.

        Runs on after a stop while a handler still finishes (its checkpoint is written under a
        valid lease); `close` then releases it.
        """
        while True:
            if stop.is_set() and self.idle.is_set():
                return
            interval = self.settings.lease_renew_s if self.lease.holding else min(1.0, self.settings.lease_renew_s)
            await first_of(self.idle if stop.is_set() else stop, timeout=interval)
            if stop.is_set() and self.idle.is_set():
                return
            if self.lease.holding:
                try:
                    renewed = await self.lease.renew()
                except Exception as exc:  # noqa: BLE001 - NATS away: the lease holds until its own clock says not
                    log.warning("lease not renewed; trying again", error=repr(exc),
                                still_valid=self.lease.still_valid())
                    renewed = self.lease.still_valid()
                if not renewed:
                    await self._lose_lease("not renewed in time, or another trainer took it")
            elif not stop.is_set():
                try:
                    taken = await self.lease.try_acquire()
                except Exception as exc:  # noqa: BLE001 - NATS away: look again later
                    log.warning("lease not read", error=repr(exc))
                    continue
                if taken:
                    await self._take_over()

    # ------------------------------------------------------------------ datasets

    async def on_dataset_accepted(self, event: DatasetAccepted, delivery: Delivery) -> None:
        self.idle.clear()
        try:
            await self._handle(event, delivery)
        except StaleState as exc:
            await self._lose_lease(str(exc))
            raise Interrupted(f"another trainer holds the model: {exc}") from exc
        finally:
            self.idle.set()

    async def _handle(self, event: DatasetAccepted, delivery: Delivery) -> None:
        dlog = log.bind(dataset_id=event.dataset_id, dataset=event.name, priority=event.priority)
        if not self.lease.still_valid():
            raise Interrupted("this trainer does not hold the model's lease", retry_in_s=RELEASE_DELAY_S)
        if done := await self.states.finished_checkpoint(event.dataset_id):
            dlog.info("dataset already trained; acked without retraining", checkpoint=done)
            self._datasets.labels("already_trained").inc()
            await self._end_pending(event.dataset_id)  # a record left behind, if any
            return
        pending = self.state.pending
        if pending is not None and pending.dataset_id != event.dataset_id:
            if await self._still_queued(pending):
                dlog.debug("released: an interrupted run resumes first", pending_dataset_id=pending.dataset_id,
                           pending_run_id=pending.run_id, retry_in_s=RELEASE_DELAY_S)
                raise Interrupted(f"dataset {pending.dataset_id} resumes its run {pending.run_id} first",
                                  retry_in_s=RELEASE_DELAY_S)
            dlog.warning("pending run given up: its dataset's message is no longer queued (settled, dead-lettered "
                         "or expired)", pending_dataset_id=pending.dataset_id, pending_run_id=pending.run_id)
            await self._set_pending(None)
            pending = None
        # While a run is pending nothing else finishes, so the current weights are the ones it
        # started from and the run id comes out the same: the run resumes from its checkpoint.
        init_weights = self.state.current_weights or self.base_weights
        recipe = self.settings.hyperparameters.identity(self.settings.max_length)
        run_id = run_id_for(event.dataset_id, init_weights, recipe)
        if pending is not None and pending.run_id != run_id:
            dlog.warning("the pending run cannot resume: the base model or the training settings changed; "
                         "a new run starts", pending_run_id=pending.run_id, pending_init_weights=pending.init_weights,
                         run_id=run_id, init_weights=init_weights)
        try:
            check_room(self.store.location("checkpoints", run_id), self.settings.disk_floor_bytes, f"run {run_id}")
        except DiskFull:
            await self._prune()
            try:
                check_room(self.store.location("checkpoints", run_id), self.settings.disk_floor_bytes, f"run {run_id}")
            except DiskFull as exc:
                await self._pause_for_disk(exc, run_id=run_id, dataset_id=event.dataset_id)
                raise Interrupted(str(exc)) from exc
        try:
            dataset_path = await self.store.fetch(event.uri, event.sha256)
            init_path = await self._fetch_current_weights()
        except ArtifactError as exc:
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            await self._end_pending(event.dataset_id)
            raise Reject(str(exc)) from exc
        earlier, replay_paths = await self._fetch_replays()
        job = TrainingJob(
            run_id=run_id, dataset_id=event.dataset_id, dataset_path=dataset_path, init_weights=init_weights,
            init_path=init_path, run_dir=self.store.location("checkpoints", run_id),
            base_global_step=self.state.global_step, replay_paths=tuple(replay_paths),
            schema=event.schema, replay_schemas=tuple(d.schema for d in earlier),
            profile=event.profile, replay_ids=tuple(d.dataset_id for d in earlier),
            replay_profiles=tuple(d.profile for d in earlier),
        )
        # Durable before the first step: from here until the run ends, this dataset trains next.
        await self._set_pending(PendingRun(
            dataset_id=event.dataset_id, run_id=run_id, init_weights=init_weights,
            consumer=delivery.spec.durable if delivery.spec else "", stream_sequence=delivery.stream_sequence,
        ))
        dlog.info("training dataset", run_id=run_id, init_weights=init_weights, schema=event.schema,
                  delivery=delivery.num_delivered, failures=delivery.failures)
        started = time.monotonic()
        self.gate.clear_skip()
        self.run_status.active = True
        try:
            result = await asyncio.to_thread(self._train, job)
        except DiskFull as exc:
            await self._prune()
            await self._pause_for_disk(exc, run_id=run_id, dataset_id=event.dataset_id, step=self.run_status.step)
            self._datasets.labels("interrupted").inc()
            raise Interrupted(f"run {run_id} paused: {exc}") from exc
        except (DatasetError, Diverged) as exc:
            # Neither gets better by trying again: the same rows, weights and seed.
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            await self._end_pending(event.dataset_id)
            raise Reject(str(exc)) from exc
        except Exception as exc:
            if abandoned := self.gate.abandoned:
                raise Interrupted(f"run {run_id} abandoned: {abandoned}") from exc
            if skip := self.gate.skip_requested:  # asked to give it up anyway: no retry
                await self._skipped(job, skip, step=None)
                return
            # Only failures count toward max_deliver (the bus counts them), not interruptions.
            will_retry = delivery.failures + 1 < delivery.spec.max_deliver
            await self._fail(run_id, event.dataset_id, exc, will_retry=will_retry)
            if not will_retry:
                await self._end_pending(event.dataset_id)
            raise
        finally:
            self.run_status.active = False
        if abandoned := self.gate.abandoned:
            # Not this trainer's to record any more: the lease holder resumes it from its checkpoint.
            self._datasets.labels("interrupted").inc()
            raise Interrupted(f"run {run_id} abandoned at step {result.step}: {abandoned}")
        if skip := self.gate.skip_requested:
            # Even when the run reached its last step meanwhile: the skip was granted, so the
            # dataset is not recorded as trained.
            await self._skipped(job, skip, step=result.step)
            return
        if not result.finished:
            self._datasets.labels("interrupted").inc()
            raise Interrupted(f"run {job.run_id} stopped at step {result.step}; it resumes on redelivery")
        await self._finish(job, result, duration_s=time.monotonic() - started)

    async def _fetch_replays(self) -> tuple[list, list[Path]]:
        """The earlier datasets replay draws from, and their paths; one that no longer verifies
        is left out (the run goes on with the others), as the recipe leaves out one that no longer reads."""
        earlier, paths = [], []
        for trained in self.state.trained[-self.settings.hyperparameters.replay_datasets:]:
            try:
                # A dataset's id is the sha256 of its normalised content: its artifact's hash.
                paths.append(await self.store.fetch(trained.uri, trained.dataset_id))
            except ArtifactError as exc:
                log.warning("earlier dataset not replayed", dataset_id=trained.dataset_id, error=str(exc))
                continue
            earlier.append(trained)
        return earlier, paths

    async def _fetch_current_weights(self) -> Path:
        """Where the weights the next run starts from are: the latest finished ones, or the base model."""
        if self.state.current_weights:
            return await self.store.fetch(self.state.current_weights, self.state.current_weights_sha256)
        return self.base_model

    async def _still_queued(self, pending: PendingRun) -> bool:
        """Whether the pending run's dataset message can still be (re)delivered to the trainer."""
        spec = next((c for c in topology.TRAINER if c.durable == pending.consumer), None)
        if spec is None or not pending.stream_sequence:
            return False
        try:
            return await self.bus.still_queued(spec, pending.stream_sequence)
        except Exception as exc:  # noqa: BLE001 - unsure: keep waiting for it (a release, not a failure)
            log.warning("cannot tell whether the pending run's dataset is still queued; waiting for it",
                        error=repr(exc), pending_run_id=pending.run_id)
            return True

    async def _set_pending(self, pending: PendingRun | None) -> None:
        await self.states.save(with_pending(self.state, pending))

    async def _end_pending(self, dataset_id: str) -> None:
        """The dataset's run ended for good (failed, skipped): other datasets may train now."""
        if self.state.pending is not None and self.state.pending.dataset_id == dataset_id:
            await self._set_pending(None)

    def _train(self, job: TrainingJob) -> TrainingResult:
        """The whole run, in a worker thread."""
        # The recipe also emits from threads of its own (its checkpoint writer), which start with
        # an empty context: every event of the run is published in this thread's instead.
        emit = partial(self._emit_from_thread, contextvars.copy_context())
        # In this process or on a Ray cluster (services/trainer/backend.py): the same recipe.
        return backend.train(self.settings, job, self.store, self.gate, emit)

    def _emit_from_thread(self, context: contextvars.Context, subject: str, event: Event) -> None:
        """Publish on the service loop and wait for the ack (keeps events in order).

        `context` is the run's worker thread's, a copy of the handler's (asyncio.to_thread), and
        run_coroutine_threadsafe schedules the publish in a copy of the context it is called in,
        so every publication is a child of the span of the dataset.accepted message: one trace.
        An event that names a checkpoint is published only once the checkpoint is shared (an
        upload when hosts share no disk: minutes for a big model), so only progress has a timeout.
        """
        self.run_status.observe(event)
        # A copy per call: two threads (training, checkpoint writer) cannot enter one context at once.
        future = context.copy().run(asyncio.run_coroutine_threadsafe, self.bus.publish(subject, event), self._loop)
        if subject != topology.TRAINING_PROGRESS:
            future.result()
            if subject == topology.CHECKPOINT_SAVED:
                # Older checkpoints of the run may go now (never the one just saved: it is the newest).
                asyncio.run_coroutine_threadsafe(self._prune(), self._loop)
            return
        try:
            future.result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - progress is informational: losing one must not fail a run
            log.warning("progress event not published", error=repr(exc))

    async def _finish(self, job: TrainingJob, result: TrainingResult, *, duration_s: float) -> None:
        # Publish before recording: if we die in between, the redelivery finds the final
        # checkpoint, republishes the same (deduplicated) events and records then.
        finished = TrainingFinished(
            id=event_id("finished", job.run_id), run_id=job.run_id, dataset_id=job.dataset_id,
            global_step=result.global_step, final_loss=result.loss, checkpoint_uri=result.checkpoint.uri,
            duration_s=round(duration_s, 3), tokens=result.tokens,
        )
        await self.bus.publish(topology.TRAINING_FINISHED, finished)
        await self.states.save(record_finished(self.state, job.dataset_id, self.store.uri_for(job.dataset_path),
                                               result.checkpoint, result.global_step, job.schema, job.profile))
        self.run_status.observe(finished)
        self._datasets.labels("finished").inc()
        log.info("dataset trained", run_id=job.run_id, dataset_id=job.dataset_id, global_step=result.global_step,
                 final_loss=result.loss, checkpoint=result.checkpoint.uri)
        await self._prune(fresh=True)

    async def _skipped(self, job: TrainingJob, skip: Skip, *, step: int | None) -> None:
        """Give the run's dataset up: announce why, never record it as trained, ack its message."""
        at = f" at step {step}" if step is not None else ""
        error = f"skipped by {skip.requested_by}{at}: {skip.reason}"
        log.warning("run skipped; its dataset is not trained", run_id=job.run_id, dataset_id=job.dataset_id,
                    requested_by=skip.requested_by, reason=skip.reason, step=step)
        self._datasets.labels("skipped").inc()
        await self.bus.publish(topology.TRAINING_FAILED, TrainingFailed(
            run_id=job.run_id, dataset_id=job.dataset_id, error=error[:2000], will_retry=False,
        ))
        await self._end_pending(job.dataset_id)
        self.gate.clear_skip()

    async def _fail(self, run_id: str, dataset_id: str, exc: Exception, *, will_retry: bool) -> None:
        log.error("training failed", run_id=run_id, dataset_id=dataset_id, error=repr(exc), will_retry=will_retry)
        self._datasets.labels("failed" if will_retry else "rejected").inc()
        await self.bus.publish(topology.TRAINING_FAILED, TrainingFailed(
            run_id=run_id, dataset_id=dataset_id, error=repr(exc)[:2000], will_retry=will_retry,
        ))

    # ------------------------------------------------------------------ disk

    async def _prune(self, *, fresh: bool = False) -> None:
        """Apply retention (the lease holder only); a failure is logged, never fails a run."""
        if not self.lease.still_valid():
            return
        pending = self.state.pending
        resume = {self.state.current_weights} if self.state.current_weights else set()
        if pending is not None:
            latest = resumable_checkpoint(self.store.location("checkpoints", pending.run_id))
            if latest is not None:
                resume.add(self.store.uri_for(latest))
        try:
            await self.pruner.prune(resume, pending.run_id if pending else None, fresh=fresh)
        except Exception as exc:  # noqa: BLE001 - the disk floor still guards the disk
            log.warning("retention not applied", error=repr(exc))

    async def _pause_for_disk(self, exc: DiskFull, *, run_id: str = "", dataset_id: str = "",
                              step: int | None = None) -> None:
        """Stop taking work until the disk has room again, and say so (once per pause)."""
        first = self.disk_full is None
        self.disk_full = exc
        self._update_valve()
        if not first:
            return
        log.error("disk below the floor: training paused until there is room", free_bytes=exc.free_bytes,
                  floor_bytes=exc.floor_bytes, before=exc.before, run_id=run_id or None)
        await self.bus.publish(topology.TRAINING_PAUSED, TrainingPaused(
            reason=str(exc), free_bytes=exc.free_bytes, floor_bytes=exc.floor_bytes, run_id=run_id,
            dataset_id=dataset_id, step=step,
        ), attempts=3)

    async def watch_disk(self, stop: asyncio.Event) -> None:
        """While paused for disk space, look every few seconds whether there is room again."""
        while not stop.is_set():
            await first_of(stop, timeout=DISK_CHECK_S)
            if self.disk_full is None or stop.is_set():
                continue
            free = await asyncio.to_thread(free_bytes, self.store.location("checkpoints"))
            if room_again(free, self.settings.disk_floor_bytes):
                log.info("disk has room again: training resumes", free_bytes=free,
                         floor_bytes=self.settings.disk_floor_bytes)
                self.disk_full = None
                self._update_valve()

    # ------------------------------------------------------------------ control

    async def control(self, action: Action, requested_by: str, reason: str = "") -> ControlReply:
        """pause / resume / stop / skip, from NATS or HTTP: decide, persist, apply."""
        decision = decide(self.gate.mode, action, training=self.run_status.active, reason=reason)
        message = decision.message
        pending = self.state.pending
        if decision.ok and action == "skip":
            # While a run is active the pending record names it (written before its first step).
            self.gate.skip(Skip(requested_by=requested_by, reason=reason.strip()))
            if pending is not None:
                message = f"skipping dataset {pending.dataset_id} (run {pending.run_id}): it will not be trained"
            log.info("control", action=action, requested_by=requested_by, reason=reason,
                     run_id=pending.run_id if pending else None)
        elif decision.ok and decision.mode != self.gate.mode:
            await self.control_record.put(TrainerControl(mode=decision.mode, requested_by=requested_by))
            self._apply_mode(decision.mode)
            log.info("control", action=action, mode=decision.mode, requested_by=requested_by)
        elif action == "skip" and not self.run_status.active and pending is not None:
            message += (f"; dataset {pending.dataset_id} has an interrupted run pending ({pending.run_id}): "
                        "resume the trainer to continue it, then skip it")
        return ControlReply(ok=decision.ok, state=self.state_word(), message=message)

    async def on_control_request(self, request: ControlTraining, subject: str) -> ControlReply:
        named = subject.rsplit(".", 1)[-1]
        if named != request.action:
            message = f"subject says {named!r} but the request says {request.action!r}"
            return ControlReply(ok=False, state=self.state_word(), message=message)
        if request.action == "skip" and not self.lease.holding:
            # Every trainer of the model hears a command; a skip is the holder's to answer.
            await asyncio.sleep(STANDBY_SKIP_REPLY_DELAY_S)
            return ControlReply(ok=False, state=self.state_word(),
                                message=f"standby: {self._holder_name()} trains this model; nothing to skip here")
        # pause / resume / stop: a mode every trainer of the model shares (persisted in KV).
        return await self.control(request.action, request.requested_by, request.reason)

    def _apply_mode(self, mode: Mode) -> None:
        self.gate.set_mode(mode)
        self._update_valve()

    def _update_valve(self) -> None:
        if self.gate.mode == "running" and self.lease.holding and self.disk_full is None:
            self.work_allowed.set()
        else:
            self.work_allowed.clear()

    # ------------------------------------------------------------------ status

    def _holder_name(self) -> str:
        seen = self.lease.seen
        return seen.holder if seen and not seen.released else "no trainer"

    def state_word(self) -> str:
        if not self.lease.holding:
            return "standby"
        active = self.run_status.active
        if self.disk_full is not None and not active:
            return "disk_full"
        return describe_state(self.gate.mode, active, self.gate.waiting,
                              skipping=active and self.gate.skip_requested is not None)

    def snapshot(self) -> dict:
        seen = self.lease.seen
        return {
            "state": self.state_word(),
            "mode": self.gate.mode,
            "run": self.run_status.as_dict(),
            "current_weights": self.state.current_weights or self.base_weights,
            "global_step": self.state.global_step,
            "datasets_finished": len(self.state.finished),
            # The run that resumes before any other dataset trains (None: none).
            "pending_run": msgspec.to_builtins(self.state.pending) if self.state.pending else None,
            # Who trains this base model: this trainer (holding) or another (this one stands by).
            "lease": {
                "holding": self.lease.holding,
                "me": self.lease.me,
                "holder": seen.holder if seen and not seen.released else None,
                "holder_host": seen.host if seen and not seen.released else None,
            },
            "disk": None if self.disk_full is None else {
                "free_bytes": self.disk_full.free_bytes, "floor_bytes": self.disk_full.floor_bytes,
                "reason": str(self.disk_full),
            },
        }


SERVICE = Service(
    name=NAME,
    settings=TrainerSettings,
    build=TrainerService.open,
    subscriptions=(
        Subscribe(topology.DATASET_ACCEPTED, DatasetAccepted, TrainerService.on_dataset_accepted,
                  consumers=topology.TRAINER, while_open=lambda trainer: trainer.work_allowed,
                  summary="trainer consumes (durables trainer-high, -normal, -low, drained in that order; "
                          "one dataset at a time, as a lease; none taken while paused or stopped, while another "
                          "trainer holds the model's lease, or while the disk is below the floor)"),
    ),
    publications=(
        Publish(topology.TRAINING_STARTED, TrainingStarted),
        Publish(topology.TRAINING_PROGRESS, TrainingProgress),
        Publish(topology.TRAINING_FINISHED, TrainingFinished),
        Publish(topology.TRAINING_FAILED, TrainingFailed),
        Publish(topology.CHECKPOINT_SAVED, CheckpointSaved),
        Publish(topology.TRAINING_PAUSED, TrainingPaused,
                summary="the trainer paused itself: the disk under its artifacts is below the floor"),
    ),
    replies=(Reply(topology.CONTROL_TRAINER_ACTION, ControlTraining, ControlReply, TrainerService.on_control_request),),
    routes=router,
    loops=(TrainerService.keep_lease, TrainerService.watch_disk),
    on_stop=TrainerService.interrupt,
    close=TrainerService.close,
)
