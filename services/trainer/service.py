"""The trainer service: fine-tunes the current weights on each accepted dataset, one at a time.

Consumes `dataset.accepted.{high,normal,low}` (durables trainer-high/-normal/-low, drained in
that order) and answers core-NATS requests on `control.trainer.<pause|resume|stop>`.
Publishes training.started / progress / finished / failed and checkpoint.saved.

A dataset's message is a lease, kept alive by the bus's heartbeats while the recipe runs in a
worker thread (the event loop stays free). It is acked only once the run's final checkpoint
is on disk, training.finished is published and the trainer state file names the new weights.
A stop command or SIGTERM checkpoints the current step and releases the message: its
redelivery resumes the same run exactly. A dataset already finished is acked untouched.

Run: `python -m services.trainer` (settings: services/trainer/settings.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import transformers

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore
from libs.common.bus import Bus, Delivery, Interrupted, Reject
from libs.common.events import (
    ControlReply,
    ControlTraining,
    DatasetAccepted,
    Event,
    TrainingFailed,
    TrainingFinished,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import read_entry
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.runtime import ServiceRuntime, run_service
from services.trainer import api
from services.trainer.checkpoints import run_id_for
from services.trainer.control import CONTROL_KEY, Action, ControlGate, ControlState, Mode, decide
from services.trainer.data import DatasetError
from services.trainer.recipe import FullFinetuneRecipe, TrainingJob, TrainingResult, event_id, recipe_identity
from services.trainer.settings import TrainerSettings
from services.trainer.state import STATE_FILE, TrainerState, load_state, record_finished, save_state
from services.trainer.status import RunStatus, describe_state

log = get_logger("trainer")


class TrainerService:
    def __init__(self, settings: TrainerSettings, bus: Bus, stop: asyncio.Event, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.bus = bus
        self.stop = stop
        self.store = ArtifactStore(Path(settings.data_dir) / "artifacts")
        self.state_path = settings.service_dir("trainer") / STATE_FILE
        self.state: TrainerState = load_state(self.state_path)
        self.gate = ControlGate()
        self.run_status = RunStatus()
        self.base_model: Path | None = None
        self._datasets = metrics.counter("flywheel_trainer_datasets_total", "Datasets handled", ("outcome",))
        self._work_allowed = asyncio.Event()
        self._round_stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Resolve the base model, restore the persisted control mode, serve control requests."""
        self._loop = asyncio.get_running_loop()
        self.base_model = await asyncio.to_thread(ensure_base_model, self.settings.data_dir, self.settings.base_model)
        self._kv = await self.bus.kv(topology.TRAINER_BUCKET)
        persisted, _ = await read_entry(self._kv, CONTROL_KEY)
        mode = msgspec.json.decode(persisted, type=ControlState).mode if persisted else "running"
        self._apply_mode(mode)
        await self.bus.serve(f"{topology.CONTROL_TRAINER}.*", ControlTraining, self._on_control_request)
        log.info("trainer ready", base_model=str(self.base_model), mode=mode,
                 current_weights=self.state.current_weights or "base", global_step=self.state.global_step)

    async def run(self) -> None:
        """Take datasets whenever the mode is `running`, until the service stops."""
        watcher = asyncio.create_task(self._stop_on_shutdown())
        try:
            while not self.stop.is_set():
                await self._work_allowed.wait()
                if self.stop.is_set():
                    break
                # A fresh round per stretch of `running`: leaving it ends the round.
                self._round_stop = asyncio.Event()
                if self.gate.mode != "running":
                    continue
                await self.bus.consume(topology.TRAINER, DatasetAccepted, self.handle, self._round_stop)
        finally:
            watcher.cancel()

    async def _stop_on_shutdown(self) -> None:
        await self.stop.wait()
        self.gate.shut_down()
        self._round_stop.set()
        self._work_allowed.set()

    # ------------------------------------------------------------------ datasets

    async def handle(self, event: DatasetAccepted, delivery: Delivery) -> None:
        dlog = log.bind(dataset_id=event.dataset_id, dataset=event.name, priority=event.priority)
        if done := self.state.finished.get(event.dataset_id):
            dlog.info("dataset already trained; acked without retraining", checkpoint=done)
            self._datasets.labels("skipped").inc()
            return
        init_weights, init_path = self._current_weights()
        run_id = run_id_for(event.dataset_id, init_weights, recipe_identity(self.settings))
        try:
            dataset_path = await asyncio.to_thread(self.store.verify, event.uri, event.sha256)
        except ArtifactError as exc:
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            raise Reject(str(exc)) from exc
        job = TrainingJob(
            run_id=run_id, dataset_id=event.dataset_id, dataset_path=dataset_path, init_weights=init_weights,
            init_path=init_path, run_dir=self.store.location("checkpoints", run_id),
            base_global_step=self.state.global_step,
        )
        dlog.info("training dataset", run_id=run_id, init_weights=init_weights, delivery=delivery.num_delivered)
        started = time.monotonic()
        self.run_status.active = True
        try:
            result = await asyncio.to_thread(self._train, job)
        except DatasetError as exc:
            await self._fail(run_id, event.dataset_id, exc, will_retry=False)
            raise Reject(str(exc)) from exc
        except Exception as exc:
            will_retry = delivery.num_delivered < delivery.spec.max_deliver
            await self._fail(run_id, event.dataset_id, exc, will_retry=will_retry)
            raise
        finally:
            self.run_status.active = False
        if not result.finished:
            self._datasets.labels("interrupted").inc()
            raise Interrupted(f"run {job.run_id} stopped at step {result.step}; it resumes on redelivery")
        await self._finish(job, result, duration_s=time.monotonic() - started)

    def _current_weights(self) -> tuple[str, Path]:
        """What the next run starts from: (identity URI, local path) of the latest finished weights."""
        if self.state.current_weights:
            return self.state.current_weights, self.store.path_for(self.state.current_weights)
        return self.base_model.resolve().as_uri(), self.base_model

    def _train(self, job: TrainingJob) -> TrainingResult:
        """The whole run, in a worker thread."""
        recipe = FullFinetuneRecipe(self.settings, job, self.store, self.gate, self._emit_from_thread)
        try:
            recipe.setup()
            return recipe.train()
        finally:
            recipe.cleanup()

    def _emit_from_thread(self, subject: str, event: Event) -> None:
        """Publish on the service loop and wait for the ack (keeps events in order).

        The worker thread runs in a copy of the handler's context (asyncio.to_thread), and
        run_coroutine_threadsafe schedules the publish in a copy of the thread's, so the
        publication is a child of the span of the dataset.accepted message: one trace.
        """
        self.run_status.observe(event)
        future = asyncio.run_coroutine_threadsafe(self.bus.publish(subject, event), self._loop)
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
        self.state = record_finished(self.state, job.dataset_id, result.checkpoint, result.global_step)
        await asyncio.to_thread(save_state, self.state_path, self.state)
        self.run_status.observe(finished)
        self._datasets.labels("finished").inc()
        log.info("dataset trained", run_id=job.run_id, dataset_id=job.dataset_id, global_step=result.global_step,
                 final_loss=result.loss, checkpoint=result.checkpoint.uri)

    async def _fail(self, run_id: str, dataset_id: str, exc: Exception, *, will_retry: bool) -> None:
        log.error("training failed", run_id=run_id, dataset_id=dataset_id, error=repr(exc), will_retry=will_retry)
        self._datasets.labels("failed" if will_retry else "rejected").inc()
        await self.bus.publish(topology.TRAINING_FAILED, TrainingFailed(
            run_id=run_id, dataset_id=dataset_id, error=repr(exc)[:2000], will_retry=will_retry,
        ))

    # ------------------------------------------------------------------ control

    async def control(self, action: Action, requested_by: str) -> ControlReply:
        """pause / resume / stop, from NATS or HTTP: decide, persist, apply."""
        decision = decide(self.gate.mode, action)
        if decision.ok and decision.mode != self.gate.mode:
            persisted = ControlState(mode=decision.mode, requested_by=requested_by)
            await self._kv.put(CONTROL_KEY, msgspec.json.encode(persisted))
            self._apply_mode(decision.mode)
            log.info("control", action=action, mode=decision.mode, requested_by=requested_by)
        return ControlReply(ok=decision.ok, state=self.state_word(), message=decision.message)

    async def _on_control_request(self, request: ControlTraining, subject: str) -> ControlReply:
        named = subject.rsplit(".", 1)[-1]
        if named != request.action:
            message = f"subject says {named!r} but the request says {request.action!r}"
            return ControlReply(ok=False, state=self.state_word(), message=message)
        return await self.control(request.action, request.requested_by)

    def _apply_mode(self, mode: Mode) -> None:
        self.gate.set_mode(mode)
        if mode == "running":
            self._work_allowed.set()
        else:
            self._work_allowed.clear()
            self._round_stop.set()

    # ------------------------------------------------------------------ status

    def state_word(self) -> str:
        return describe_state(self.gate.mode, self.run_status.active, self.gate.waiting)

    def snapshot(self) -> dict:
        return {
            "state": self.state_word(),
            "mode": self.gate.mode,
            "run": self.run_status.as_dict(),
            "current_weights": self.state.current_weights or (self._current_weights()[0] if self.base_model else ""),
            "global_step": self.state.global_step,
            "datasets_finished": len(self.state.finished),
        }


async def start(rt: ServiceRuntime[TrainerSettings]) -> None:
    # HF's own tqdm bars (loading, saving shards) would interleave with the JSON log lines.
    transformers.utils.logging.disable_progress_bar()
    service = TrainerService(rt.settings, rt.bus, rt.stop, rt.metrics)
    await service.open()
    rt.app.include_router(api.router(service))
    rt.checks["base_model"] = lambda: service.base_model is not None
    rt.spawn(service.run(), "train")


def main() -> None:
    run_service("trainer", TrainerSettings, start)
