"""Evaluator: scores every run's final checkpoint on the fixed held-out suite and publishes `EvalScored`.

The suite holds every skill's levels (`services.evaluator.suite`); scores are per "<skill>/<level>".

Consumes `checkpoint.saved` (intermediate checkpoints are acked unscored: only a finished run's
weights are a candidate, and a diverged run has none); loads THAT checkpoint from the artifact store (after checking its
sha256), never the served model; publishes `eval.scored` with the statistics of
`services.evaluator.scoring` and the regressions against the champion (the champion record in
KV, and the champion's own score on this suite in the scorebook). An evaluation is keyed by
(checkpoint sha256, suite version): a redelivery republishes the recorded event with the same
id and scores nothing.

A checkpoint trained on a data profile (`CheckpointSaved.profile`, libs.common.profiles) is
scored as its model is asked: the profile's system prompt and generation rules
(`services.evaluator.scoring`); an unknown profile is refused (dead-lettered with the reason).
The profile is kept with the score, so the champion rescored on a new suite is asked the same way.

Each checkpoint's evaluation also probes fresh training-split problems; the ones it fails are
submitted as a low-priority dataset through the gatekeeper (`dataset.submitted`, channel
hard-examples; `services.evaluator.hard_examples`), recorded with the score and republished
with it on a redelivery.

The deployer compares a candidate with the champion only on the same suite, so when the
champion's record holds another suite's score (the suite changed, or a rollback restored an
older champion), a loop scores the champion's checkpoint on this suite and publishes that
(checked every `champion_check_s`). While there is no champion at all, the same loop scores the
base model once (`services.evaluator.base_model`: run_id "base", step 0, registered in the
artifact store) and publishes it, so the base is the first champion and every trained
candidate must beat it; keyed by (sha256, suite version) like any score, it is scored once even
across restarts. Run with `python -m services.evaluator`.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore, is_sha256
from libs.common.bus import Bus, Delivery, Reject
from libs.common.events import (
    CheckpointSaved,
    DatasetSubmitted,
    EvalScored,
    derived_id,
    score_regressions,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model, pick_device
from libs.common.profiles import DEFAULT_PROFILE, UnknownProfile, get_profile
from libs.common.records import CHAMPION, Champion
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from services.evaluator.api import router
from services.evaluator.base_model import BASE_RUN_ID, BASE_STEP, register_base_model
from services.evaluator.hard_examples import (
    failed_rows,
    hard_examples_submission,
    learned_levels,
    probe_items,
    submission_id,
)
from services.evaluator.scorebook import Scorebook, ScoreRecord
from services.evaluator.scoring import Scores, score_checkpoint
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import SuiteItem, load_or_create_suite

NAME = "evaluator"
log = get_logger(NAME)


class Evaluator:
    def __init__(self, settings: EvaluatorSettings, bus: Bus, metrics: ServiceMetrics, store: ArtifactStore,
                 champion: Record[Champion]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.store = store
        self.champion = champion
        folder = settings.service_dir(NAME)
        self.suite = load_or_create_suite(
            folder / "suites", settings.suite_max_levels, settings.items_per_level, settings.suite_seed
        )
        self.scorebook = Scorebook(folder / "scores")
        self.device = pick_device(settings.device)
        # One model in memory at a time: a checkpoint and the champion's rescore take turns.
        self._scoring = asyncio.Lock()
        # The base model as an artifact, once registered (see `_score_base`).
        self._base: Artifact | None = None
        log.info("suite ready", suite_version=self.suite.version, items=len(self.suite.items),
                 levels=self.suite.levels(), device=self.device)

    @classmethod
    async def open(cls, rt: ServiceRuntime[EvaluatorSettings]) -> Evaluator:
        champion = await rt.bus.record(CHAMPION)
        return await asyncio.to_thread(cls, rt.settings, rt.bus, rt.metrics, rt.store, champion)

    async def on_checkpoint_saved(self, event: CheckpointSaved, delivery: Delivery) -> None:
        if not event.final:
            # Only a run's final checkpoint is a candidate: a run that diverged or was stopped
            # has none, and progression counts distinct finished runs, not steps of one.
            self.metrics.events_handled.labels(delivery.subject, "intermediate").inc()
            return
        if not is_sha256(event.sha256):
            raise Reject(f"checkpoint sha256 {event.sha256!r} is not a sha256 hex digest")
        try:
            get_profile(event.profile)
        except UnknownProfile as exc:
            raise Reject(f"checkpoint {event.uri}: {exc}") from exc
        if record := self.scorebook.get(event.sha256, self.suite.version):
            log.info("already scored; republishing", checkpoint=event.uri, suite_version=self.suite.version)
            await self.publish(record)
            self.metrics.events_handled.labels(delivery.subject, "duplicate").inc()
            return
        try:
            record = await self.score(event.run_id, event.step, event.uri, event.sha256, probe=True,
                                      profile=event.profile)
        except ArtifactError as exc:
            raise Reject(str(exc)) from exc
        await self.publish(record)
        self.metrics.events_handled.labels(delivery.subject, "scored").inc()

    async def publish(self, record: ScoreRecord) -> None:
        """The score, then its hard examples (both with the ids recorded: a republish is a duplicate)."""
        await self.bus.publish(topology.EVAL_SCORED, record.event)
        if record.hard_examples is not None:
            await self.bus.publish(topology.DATASET_SUBMITTED, record.hard_examples)

    async def score(self, run_id: str, step: int, uri: str, sha256: str, *, probe: bool = False,
                    profile: str = DEFAULT_PROFILE) -> ScoreRecord:
        """Score the checkpoint at `uri` on the suite, asked as data profile `profile` asks, and record
        it; raises ArtifactError for a bad artifact.

        With `probe`, also probe it for hard examples (a champion rescored on a new suite was
        probed when it was first scored).
        """
        async with self._scoring:
            if (record := self.scorebook.get(sha256, self.suite.version)) and record.event.outcomes:
                return record  # scored while this call waited for its turn
            # Without a shared disk a checkpoint comes from the object store; that copy is only
            # needed while scoring (inference fetches what it serves), so it does not pile up here.
            fetched = self.store.is_shared(uri) and not self.store.path_for(uri).exists()
            path = await self.store.fetch(uri, sha256)
            log.info("scoring checkpoint", checkpoint=uri, run_id=run_id, step=step)
            per_level = self.settings.hard_probe_items if probe else 0
            probes = await asyncio.to_thread(probe_items, self.suite, per_level, sha256)
            scores = await asyncio.to_thread(
                score_checkpoint, path, self.suite.items,
                device=self.device,
                batch_size=self.settings.batch_size,
                max_new_tokens=self.settings.max_new_tokens,
                max_length=self.settings.max_length,
                probes=probes,
                profile=profile,
            )
            baseline = await self._champion_score(sha256)
            regressions = score_regressions(
                scores.levels, scores.val_loss, baseline.levels, baseline.val_loss,
            ) if baseline else []
            scored = EvalScored(
                # The same evaluation always has the same id.
                id=derived_id(NAME, sha256, self.suite.version),
                run_id=run_id,
                step=step,
                checkpoint_uri=uri,
                checkpoint_sha256=sha256,
                suite=self.suite.name,
                suite_version=self.suite.version,
                exact_match=scores.exact_match,
                val_loss=scores.val_loss,
                num_examples=scores.num_examples,
                by_level=scores.by_level,
                exact_match_low=scores.exact_match_low,
                exact_match_high=scores.exact_match_high,
                levels=scores.levels,
                outcomes=scores.outcomes,
                ece=scores.ece,
                regressions=regressions,
                compared_with=baseline.checkpoint_sha256 if baseline else "",
            )
            hard = await asyncio.to_thread(self._hard_examples, sha256, probes, scores, profile) if probes else None
            # Recorded before publishing: after a crash in between, the redelivery republishes it.
            record = ScoreRecord(event=scored, items=scores.items, hard_examples=hard, profile=profile)
            self.scorebook.save(record)
            if fetched:  # before the score goes out: nothing can be loading it from here yet
                await asyncio.to_thread(self.store.remove, uri)
                log.info("fetched copy removed after scoring", checkpoint=uri)
        log.info("scored", checkpoint=uri, profile=profile, exact_match=scored.exact_match, val_loss=scored.val_loss,
                 ece=scored.ece, by_level=scored.by_level, regressions=regressions,
                 hard_examples=hard.name if hard else None)
        return record

    def _hard_examples(self, sha256: str, probes: list[SuiteItem], scores: Scores,
                       profile: str) -> DatasetSubmitted | None:
        """The probes this checkpoint failed at the levels it has learned, written to the store and
        described for submission; None when fewer than `hard_examples_min` failed."""
        learned = learned_levels(scores.by_level, self.settings.hard_examples_min_accuracy)
        rows = failed_rows(probes, scores.probes, learned)
        if len(rows) < self.settings.hard_examples_min:
            log.info("too few hard examples to submit", failed=len(rows), probed=len(probes),
                     minimum=self.settings.hard_examples_min, learned_levels=sorted(learned))
            return None
        event_id = submission_id(sha256, self.suite.levels(), self.settings.hard_probe_items)
        artifact = self.store.write_lines(
            (msgspec.json.encode(row) + b"\n" for row in rows), "hard-examples", f"{event_id}.jsonl")
        return hard_examples_submission(event_id, sha256, len(rows), artifact, profile)

    async def _champion_score(self, candidate_sha256: str) -> EvalScored | None:
        """The champion's own score on this suite, if it is another checkpoint and was scored here."""
        champion, _ = await self.champion.read()
        if champion is None or champion.checkpoint_sha256 == candidate_sha256:
            return None
        record = self.scorebook.get(champion.checkpoint_sha256, self.suite.version)
        return record.event if record and record.event.levels else None

    # ------------------------------------------------------------------ the champion on this suite

    async def keep_champion_scored(self, stop: asyncio.Event) -> None:
        """Publish the champion's score on this suite whenever its record holds another suite's, and
        the base model's while there is no champion."""
        published: set[tuple[str, str]] = set()
        while not stop.is_set():
            try:
                await self._score_champion(published)
            except (nats.errors.Error, TimeoutError) as exc:
                # A NATS hiccup: try again next round. Anything else is a bug and crashes the loop.
                log.warning("champion check failed; retrying", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.champion_check_s)

    async def _score_champion(self, published: set[tuple[str, str]]) -> None:
        champion, _ = await self.champion.read()
        if champion is None:
            if self.settings.score_base_model:
                await self._score_base(published)
            return
        if champion.suite_version == self.suite.version and champion.outcomes:
            return
        key = (champion.checkpoint_sha256, self.suite.version)
        if key in published:
            return  # once per process: the deployer's durable consumer receives it
        published.add(key)
        log.info("champion not scored on this suite; scoring it", checkpoint=champion.checkpoint_uri,
                 champion_suite=champion.suite_version, suite_version=self.suite.version)
        try:
            record = await self.score(champion.run_id, champion.step, champion.checkpoint_uri,
                                      champion.checkpoint_sha256,
                                      profile=self.scorebook.profile_of(champion.checkpoint_sha256))
        except Exception as exc:  # noqa: BLE001 - a champion that cannot be scored must not stop the evaluator
            log.error("cannot score the champion on this suite; the deployer keeps it until it is",
                      checkpoint=champion.checkpoint_uri, error=repr(exc))
            return
        await self.bus.publish(topology.EVAL_SCORED, record.event)

    async def _score_base(self, published: set[tuple[str, str]]) -> None:
        """Publish the base model's score on this suite (scored once: the scorebook keeps it)."""
        key = (BASE_RUN_ID, self.suite.version)
        if key in published:
            return  # once per process: the deployer's durable consumer receives it
        try:
            if self._base is None:
                source = await asyncio.to_thread(ensure_base_model, self.settings.data_dir, self.settings.base_model)
                self._base = await asyncio.to_thread(register_base_model, self.store, source)
            record = self.scorebook.get(self._base.sha256, self.suite.version)
            if record is None:
                log.info("no champion yet; scoring the base model as the first candidate", model=self._base.uri)
                record = await self.score(BASE_RUN_ID, BASE_STEP, self._base.uri, self._base.sha256, probe=True)
        except (nats.errors.Error, TimeoutError):
            raise  # a NATS hiccup: the loop tries again next round
        except Exception as exc:  # noqa: BLE001 - a base model that cannot be scored must not stop the evaluator
            published.add(key)
            log.error("cannot score the base model; the first trained checkpoint becomes the champion",
                      base_model=self.settings.base_model or "embedded tiny model", error=repr(exc))
            return
        await self.publish(record)  # a NATS error here: tried again next round
        published.add(key)


SERVICE = Service(
    name=NAME,
    settings=EvaluatorSettings,
    build=Evaluator.open,
    subscriptions=(
        Subscribe(topology.CHECKPOINT_SAVED, CheckpointSaved, Evaluator.on_checkpoint_saved,
                  consumers=(topology.EVALUATOR,)),
    ),
    publications=(
        Publish(topology.EVAL_SCORED, EvalScored),
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted,
                "evaluator submits hard examples: fresh training problems a checkpoint failed (priority low)"),
    ),
    routes=router,
    loops=(Evaluator.keep_champion_scored,),
)
