"""The trainer service: fine-tunes the current weights on each accepted dataset, one at a time.

Consumes `dataset.accepted.{high,normal,low}` (durables trainer-high/-normal/-low, drained in
that order) and answers core-NATS requests on `control.trainer.<pause|resume|stop|skip>`.
Publishes training.started / progress / finished / failed and checkpoint.saved.

Every schema the gatekeeper accepts trains, read as `DatasetAccepted.schema` names it (chat
rows: loss on assistant tokens; completion_v1: loss on the whole text). Rows that cannot train
are dropped with their reasons (on training.started and `/status`); a dataset with none left,
or of a schema the trainer does not know, fails for good and is dead-lettered with the reason.

A dataset's message is a lease, kept alive by the bus's heartbeats while the recipe runs in a
worker thread (the event loop stays free). It is acked only once the run's final checkpoint
is on disk, training.finished is published and the trainer state file names the new weights.
A stop command or SIGTERM checkpoints the current step and releases the message: its
redelivery resumes the same run exactly. A dataset already finished is acked untouched.

A run is recorded as pending in the trainer's state before its first step (services/trainer/
state.py). Until it finishes, fails for good or is skipped, any other dataset delivered is
released again (`Interrupted`, a delay, not a failure): after a stop, a crash or a kill -9 the
interrupted dataset resumes its own run (same run id, from its last checkpoint) before anything
else changes the weights. A pending run whose message is gone for good (settled, dead-lettered,
expired) is given up, not waited for. Interruptions never count against `max_deliver`; only
failures do (the bus counts them).

`skip` (with a reason) ends the current run at once: its dataset is acked, announced as a
training.failed that will not be retried, saying who skipped it and why, and never recorded as
trained.

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
from libs.common.artifacts import ArtifactError, ArtifactStore
from libs.common.bus import Bus, Delivery, Interrupted, Reject
from libs.common.events import (
    CheckpointSaved,
    ControlReply,
    ControlTraining,
    DatasetAccepted,
    Event,
    TrainingFailed,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.records import TRAINER_CONTROL, TrainerControl
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Reply, Service, Subscribe
from services.trainer import backend
from services.trainer.api import router
from services.trainer.checkpoints import run_id_for
from services.trainer.control import Action, ControlGate, Mode, Skip, decide
from services.trainer.data import DatasetError
from services.trainer.divergence import Diverged
from services.trainer.recipe import TrainingJob, TrainingResult, event_id
from services.trainer.settings import TrainerSettings
from services.trainer.state import (
    STATE_FILE,
    PendingRun,
    TrainerState,
    load_state,
    record_finished,
    save_state,
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


class TrainerService:
    def __init__(self, settings: TrainerSettings, bus: Bus, metrics: ServiceMetrics, store: ArtifactStore,
                 control: Record[TrainerControl], base_model: Path, mode: Mode = "running") -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.control_record = control
        self.base_model = base_model
        self.state_path = settings.service_dir(NAME) / STATE_FILE
        self.state: TrainerState = load_state(self.state_path)
        if stale := stale_pending(self.state):
            log.warning("pending run record names a dataset already trained; cleared", run_id=stale.run_id,
                        dataset_id=stale.dataset_id)
            self.state = with_pending(self.state, None)
            save_state(self.state_path, self.state)
        self.gate = ControlGate()
        self.run_status = RunStatus()
        self._datasets = metrics.counter("flywheel_trainer_datasets_total", "Datasets handled", ("outcome",))
        # Set while the mode is `running`: the subscription takes new datasets only then.
        self.work_allowed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._apply_mode(mode)

    @classmethod
    async def open(cls, rt: ServiceRuntime[TrainerSettings]) -> TrainerService:
        """Resolve the base model and restore the persisted control mode."""
        # HF's own tqdm bars (loading, saving shards) would interleave with the JSON log lines.
        transformers.utils.logging.disable_progress_bar()
        settings = rt.settings
        base_model = await asyncio.to_thread(ensure_base_model, settings.data_dir, settings.base_model)
        control = await rt.bus.record(TRAINER_CONTROL)
        persisted, _ = await control.read()
        service = cls(settings, rt.bus, rt.metrics, rt.store, control, base_model,
                      persisted.mode if persisted else "running")
        pending = service.state.pending
        log.info("trainer ready", base_model=str(base_model), mode=service.gate.mode,
                 current_weights=service.state.current_weights or "base", global_step=service.state.global_step,
                 pending_run=pending.run_id if pending else None)
        return service

    def interrupt(self) -> None:
        """The process is stopping: the current run checkpoints and releases its dataset."""
        self.gate.shut_down()

    # ------------------------------------------------------------------ datasets

    async def on_dataset_accepted(self, event: DatasetAccepted, delivery: Delivery) -> None:
        dlog = log.bind(dataset_id=event.dataset_id, dataset=event.name, priority=event.priority)
        if done := self.state.finished.get(event.dataset_id):
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
        init_weights, init_path = self._current_weights()
        recipe = self.settings.hyperparameters.identity(self.settings.max_length)
        run_id = run_id_for(event.dataset_id, init_weights, recipe)
        if pending is not None and pending.run_id != run_id:
            dlog.warning("the pending run cannot resume: the base model or the training settings changed; "
                         "a new run starts", pending_run_id=pending.run_id, pending_init_weights=pending.init_weights,
                         run_id=run_id, init_weights=init_weights)
        try:
            dataset_path = await asyncio.to_thread(self.store.verify, event.uri, event.sha256)
        except ArtifactError as exc:
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            await self._end_pending(event.dataset_id)
            raise Reject(str(exc)) from exc
        earlier = self.state.trained[-self.settings.hyperparameters.replay_datasets:]
        job = TrainingJob(
            run_id=run_id, dataset_id=event.dataset_id, dataset_path=dataset_path, init_weights=init_weights,
            init_path=init_path, run_dir=self.store.location("checkpoints", run_id),
            base_global_step=self.state.global_step,
            replay_paths=tuple(self.store.path_for(d.uri) for d in earlier),
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
        except (DatasetError, Diverged) as exc:
            # Neither gets better by trying again: the same rows, weights and seed.
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            await self._end_pending(event.dataset_id)
            raise Reject(str(exc)) from exc
        except Exception as exc:
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
        if skip := self.gate.skip_requested:
            # Even when the run reached its last step meanwhile: the skip was granted, so the
            # dataset is not recorded as trained.
            await self._skipped(job, skip, step=result.step)
            return
        if not result.finished:
            self._datasets.labels("interrupted").inc()
            raise Interrupted(f"run {job.run_id} stopped at step {result.step}; it resumes on redelivery")
        await self._finish(job, result, duration_s=time.monotonic() - started)

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
        self.state = with_pending(self.state, pending)
        await asyncio.to_thread(save_state, self.state_path, self.state)

    async def _end_pending(self, dataset_id: str) -> None:
        """The dataset's run ended for good (failed, skipped): other datasets may train now."""
        if self.state.pending is not None and self.state.pending.dataset_id == dataset_id:
            await self._set_pending(None)

    def _current_weights(self) -> tuple[str, Path]:
        """What the next run starts from: (identity URI, local path) of the latest finished weights."""
        if self.state.current_weights:
            return self.state.current_weights, self.store.path_for(self.state.current_weights)
        return self.base_model.resolve().as_uri(), self.base_model

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
        """
        self.run_status.observe(event)
        # A copy per call: two threads (training, checkpoint writer) cannot enter one context at once.
        future = context.copy().run(asyncio.run_coroutine_threadsafe, self.bus.publish(subject, event), self._loop)
        try:
            future.result(timeout=30)
        except Exception as exc:
            if subject != topology.TRAINING_PROGRESS:
                raise
            # Progress is informational: losing one must not fail a training run.
            log.warning("progress event not published", error=repr(exc))

    async def _finish(self, job: TrainingJob, result: TrainingResult, *, duration_s: float) -> None:
        # Publish before recording: if we die in between, the redelivery finds the final
        # checkpoint, republishes the same (deduplicated) events and records then.
        finished = TrainingFinished(
            id=event_id("finished", job.run_id), run_id=job.run_id, dataset_id=job.dataset_id,
            global_step=result.global_step, final_loss=result.loss, checkpoint_uri=result.checkpoint.uri,
            duration_s=round(duration_s, 3),
        )
        await self.bus.publish(topology.TRAINING_FINISHED, finished)
        self.state = record_finished(self.state, job.dataset_id, self.store.uri_for(job.dataset_path),
                                     result.checkpoint, result.global_step, job.schema, job.profile)
        await asyncio.to_thread(save_state, self.state_path, self.state)
        self.run_status.observe(finished)
        self._datasets.labels("finished").inc()
        log.info("dataset trained", run_id=job.run_id, dataset_id=job.dataset_id, global_step=result.global_step,
                 final_loss=result.loss, checkpoint=result.checkpoint.uri)

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
        return await self.control(request.action, request.requested_by, request.reason)

    def _apply_mode(self, mode: Mode) -> None:
        self.gate.set_mode(mode)
        if mode == "running":
            self.work_allowed.set()
        else:
            self.work_allowed.clear()

    # ------------------------------------------------------------------ status

    def state_word(self) -> str:
        active = self.run_status.active
        return describe_state(self.gate.mode, active, self.gate.waiting,
                              skipping=active and self.gate.skip_requested is not None)

    def snapshot(self) -> dict:
        return {
            "state": self.state_word(),
            "mode": self.gate.mode,
            "run": self.run_status.as_dict(),
            "current_weights": self.state.current_weights or self._current_weights()[0],
            "global_step": self.state.global_step,
            "datasets_finished": len(self.state.finished),
            # The run that resumes before any other dataset trains (None: none).
            "pending_run": msgspec.to_builtins(self.state.pending) if self.state.pending else None,
        }


SERVICE = Service(
    name=NAME,
    settings=TrainerSettings,
    build=TrainerService.open,
    subscriptions=(
        Subscribe(topology.DATASET_ACCEPTED, DatasetAccepted, TrainerService.on_dataset_accepted,
                  consumers=topology.TRAINER, while_open=lambda trainer: trainer.work_allowed,
                  summary="trainer consumes (durables trainer-high, -normal, -low, drained in that order; "
                          "one dataset at a time, as a lease; none taken while paused or stopped)"),
    ),
    publications=(
        Publish(topology.TRAINING_STARTED, TrainingStarted),
        Publish(topology.TRAINING_PROGRESS, TrainingProgress),
        Publish(topology.TRAINING_FINISHED, TrainingFinished),
        Publish(topology.TRAINING_FAILED, TrainingFailed),
        Publish(topology.CHECKPOINT_SAVED, CheckpointSaved),
    ),
    replies=(Reply(topology.CONTROL_TRAINER_ACTION, ControlTraining, ControlReply, TrainerService.on_control_request),),
    routes=router,
    on_stop=TrainerService.interrupt,
)
