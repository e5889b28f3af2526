"""Evaluator: scores every saved checkpoint on the fixed held-out suite and publishes `EvalScored`.

Consumes `checkpoint.saved`; loads THAT checkpoint from the artifact store (after checking its
sha256), never the served model; publishes `eval.scored`. An evaluation is keyed by
(checkpoint sha256, suite version): a redelivery republishes the recorded event with the same
id and scores nothing. Run with `python -m services.evaluator`.
"""

from __future__ import annotations

import asyncio

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore, is_sha256
from libs.common.bus import Bus, Delivery, Reject
from libs.common.events import CheckpointSaved, EvalScored, derived_id
from libs.common.http import ServiceMetrics
from libs.common.log import get_logger
from libs.common.models import pick_device
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from services.evaluator.api import router
from services.evaluator.scorebook import Scorebook, ScoreRecord
from services.evaluator.scoring import score_checkpoint
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import load_or_create_suite

NAME = "evaluator"
log = get_logger(NAME)


class Evaluator:
    def __init__(self, settings: EvaluatorSettings, bus: Bus, metrics: ServiceMetrics, store: ArtifactStore) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.store = store
        folder = settings.service_dir(NAME)
        self.suite = load_or_create_suite(
            folder / "suites", settings.suite_max_level, settings.items_per_level, settings.suite_seed
        )
        self.scorebook = Scorebook(folder / "scores")
        self.device = pick_device(settings.device)
        log.info("suite ready", suite_version=self.suite.version, items=len(self.suite.items), device=self.device)

    @classmethod
    async def open(cls, rt: ServiceRuntime[EvaluatorSettings]) -> Evaluator:
        return await asyncio.to_thread(cls, rt.settings, rt.bus, rt.metrics, rt.store)

    async def on_checkpoint_saved(self, event: CheckpointSaved, delivery: Delivery) -> None:
        if not is_sha256(event.sha256):
            raise Reject(f"checkpoint sha256 {event.sha256!r} is not a sha256 hex digest")
        if record := self.scorebook.get(event.sha256, self.suite.version):
            log.info("already scored; republishing", checkpoint=event.uri, suite_version=self.suite.version)
            await self.bus.publish(topology.EVAL_SCORED, record.event)
            self.metrics.events_handled.labels(delivery.subject, "duplicate").inc()
            return
        try:
            path = await asyncio.to_thread(self.store.verify, event.uri, event.sha256)
        except ArtifactError as exc:
            raise Reject(str(exc)) from exc
        log.info("scoring checkpoint", checkpoint=event.uri, run_id=event.run_id, step=event.step)
        scores = await asyncio.to_thread(
            score_checkpoint, path, self.suite.items,
            device=self.device,
            batch_size=self.settings.batch_size,
            max_new_tokens=self.settings.max_new_tokens,
            max_length=self.settings.max_length,
        )
        scored = EvalScored(
            # The same evaluation always has the same id.
            id=derived_id(NAME, event.sha256, self.suite.version),
            run_id=event.run_id,
            step=event.step,
            checkpoint_uri=event.uri,
            checkpoint_sha256=event.sha256,
            suite=self.suite.name,
            suite_version=self.suite.version,
            exact_match=scores.exact_match,
            val_loss=scores.val_loss,
            num_examples=scores.num_examples,
            by_level=scores.by_level,
        )
        # Recorded before publishing: after a crash in between, the redelivery republishes it.
        self.scorebook.save(ScoreRecord(event=scored, items=scores.items))
        await self.bus.publish(topology.EVAL_SCORED, scored)
        self.metrics.events_handled.labels(delivery.subject, "scored").inc()
        log.info("scored", checkpoint=event.uri, exact_match=scored.exact_match, val_loss=scored.val_loss,
                 by_level=scored.by_level)


SERVICE = Service(
    name=NAME,
    settings=EvaluatorSettings,
    build=Evaluator.open,
    subscriptions=(
        Subscribe(topology.CHECKPOINT_SAVED, CheckpointSaved, Evaluator.on_checkpoint_saved,
                  consumers=(topology.EVALUATOR,)),
    ),
    publications=(Publish(topology.EVAL_SCORED, EvalScored),),
    routes=router,
)
