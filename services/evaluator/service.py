"""Evaluator: scores every saved checkpoint on the fixed held-out suite and publishes `EvalScored`.

Consumes `checkpoint.saved`; loads THAT checkpoint from the artifact store (after checking its
sha256), never the served model; publishes `eval.scored`. An evaluation is keyed by
(checkpoint sha256, suite version): a redelivery republishes the recorded event with the same
id and scores nothing. Run with `python -m services.evaluator`.
"""

from __future__ import annotations

import asyncio
import uuid

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore
from libs.common.bus import Bus, Delivery, Reject
from libs.common.events import CheckpointSaved, EvalScored
from libs.common.http import ServiceMetrics
from libs.common.log import get_logger
from libs.common.models import pick_device
from libs.common.runtime import ServiceRuntime, run_service
from libs.common.settings import CommonSettings
from services.evaluator.api import add_routes
from services.evaluator.scorebook import Scorebook, ScoreRecord, is_sha256
from services.evaluator.scoring import score_checkpoint
from services.evaluator.suite import load_or_create_suite

log = get_logger("evaluator")
# Event ids are uuid5(namespace, "<checkpoint sha256>:<suite version>"): the same evaluation
# always has the same id.
SCORE_NAMESPACE = uuid.UUID("6f2b8a52-5a4e-4c1e-9a43-3f1d0c6e7b10")


class EvaluatorSettings(CommonSettings):
    http_port: int = 0
    device: str = "auto"
    # Distinct from any training seed; the suite also draws only from the skill's eval split.
    suite_seed: int = 1_000_003
    suite_max_level: int = 5
    items_per_level: int = 16
    batch_size: int = 16
    # The longest gold answer (level 5, chained) is ~60 tokens of the tiny tokenizer.
    max_new_tokens: int = 64
    max_length: int = 512


class Evaluator:
    def __init__(self, bus: Bus, settings: EvaluatorSettings, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.settings = settings
        self.metrics = metrics
        self.store = ArtifactStore(settings.data_dir / "artifacts")
        folder = settings.service_dir("evaluator")
        self.suite = load_or_create_suite(
            folder / "suites", settings.suite_max_level, settings.items_per_level, settings.suite_seed
        )
        self.scorebook = Scorebook(folder / "scores")
        self.device = pick_device(settings.device)
        log.info("suite ready", suite_version=self.suite.version, items=len(self.suite.items), device=self.device)

    async def handle(self, event: CheckpointSaved, delivery: Delivery) -> None:
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
            id=uuid.uuid5(SCORE_NAMESPACE, f"{event.sha256}:{self.suite.version}").hex,
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


async def start(rt: ServiceRuntime[EvaluatorSettings]) -> None:
    evaluator = Evaluator(rt.bus, rt.settings, rt.metrics)
    add_routes(rt.app, evaluator.scorebook, evaluator.suite)
    rt.spawn(rt.bus.consume(topology.EVALUATOR, CheckpointSaved, evaluator.handle, rt.stop), "consume")


def main() -> None:
    run_service("evaluator", EvaluatorSettings, start)
