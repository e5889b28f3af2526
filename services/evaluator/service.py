"""Evaluator: scores every run's final checkpoint on the selection suite and publishes `EvalScored`;
scores every champion on the sealed test suite and publishes `ChampionTested`.

Both suites hold every skill's levels (`services.evaluator.suite`); scores are per "<skill>/<level>".
The selection suite decides (the deployer promotes, the curriculum levels up on `eval.scored`);
the sealed test suite only reports (`eval.tested`, which no service decides on).

Consumes `checkpoint.saved` (intermediate checkpoints are acked unscored: only a finished run's
weights are a candidate, and a diverged run has none); loads THAT checkpoint from the artifact store (after checking its
sha256), never the served model; publishes `eval.scored` with the statistics of
`services.evaluator.scoring` and the regressions against the champion (the champion record in
KV, and the champion's own score on this suite in the scorebook). An evaluation is keyed by
(checkpoint sha256, suite version): a redelivery republishes the recorded event with the same
id and scores nothing.

A candidate past the screen against the champion on the selection suite (libs.common.paired)
is also scored on the confirmation suite at the levels where it is ahead, and so is the champion
(each checkpoint once per confirmation level, `confirmbook`): the score carries both as its
`confirmation`, on which the deployer decides the promotion.

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
across restarts.

The same loop scores the champion on the sealed test suite whenever its checkpoint has no test
score on this test version (a new champion, a rollback to one never tested here, a new
`test_seed`) and publishes it on `eval.tested`: recorded first (keyed by sha256 and test version,
`ChampionTestRecord`), then published, then marked published, so each (champion, test version)
is scored once and announced once, with the same id if a crash made it go out twice. Candidates
that never became champion are never tested. Run with `python -m services.evaluator`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats.errors

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore, is_sha256
from libs.common.bus import Bus, Delivery, Reject
from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    Confirmation,
    DatasetSubmitted,
    EvalScored,
    decode_outcomes,
    derived_id,
    encode_outcomes,
    score_regressions,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model, pick_device
from libs.common.paired import confirmation_levels, screened
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
from services.evaluator.scorebook import ChampionTestRecord, ConfirmationRecord, Scorebook, ScoreRecord
from services.evaluator.scoring import ItemResult, Scores, score_checkpoint
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import (
    SuiteItem,
    load_or_create_confirmation_suite,
    load_or_create_suite,
    load_or_create_test_suite,
)

NAME = "evaluator"
log = get_logger(NAME)
# Champions before the current one that are tested on the sealed test when they were not yet.
TESTED_BACK = 2


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
        self.test_suite = load_or_create_test_suite(folder / "suites", self.suite, settings.test_seed)
        self.confirmation_suite = load_or_create_confirmation_suite(
            folder / "suites", self.suite, self.test_suite, settings.confirm_seed, settings.confirm_items_per_level)
        self.scorebook = Scorebook(folder / "scores")
        self.testbook = Scorebook(folder / "test-scores", ChampionTestRecord)
        self.confirmbook = Scorebook(folder / "confirm-scores", ConfirmationRecord)
        self.device = pick_device(settings.device)
        # One model in memory at a time: a checkpoint, the champion's rescore and its test take turns.
        self._scoring = asyncio.Lock()
        # The base model as an artifact, once registered (see `_score_base`).
        self._base: Artifact | None = None
        log.info("suites ready", suite_version=self.suite.version, items=len(self.suite.items),
                 levels=self.suite.levels(), test_suite_version=self.test_suite.version,
                 test_items=len(self.test_suite.items), confirmation_suite_version=self.confirmation_suite.version,
                 confirmation_items=len(self.confirmation_suite.items), device=self.device)

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
            log.info("scoring checkpoint", checkpoint=uri, run_id=run_id, step=step)
            per_level = self.settings.hard_probe_items if probe else 0
            probes = await asyncio.to_thread(probe_items, self.suite, per_level, sha256)
            baseline = await self._champion_score(sha256)
            async with self._checkpoint(uri, sha256) as path:
                scores = await self._score_on(path, self.suite.items, probes, profile)
                confirmation = await self._confirm(path, sha256, profile, scores, baseline) if baseline else None
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
                **scores.figures(),
                by_level=scores.by_level,
                regressions=regressions,
                compared_with=baseline.checkpoint_sha256 if baseline else "",
                confirmation=confirmation,
            )
            hard = await asyncio.to_thread(self._hard_examples, sha256, probes, scores, profile) if probes else None
            # Recorded before publishing: after a crash in between, the redelivery republishes it.
            record = ScoreRecord(event=scored, items=scores.items, hard_examples=hard, profile=profile)
            self.scorebook.save(record)
        log.info("scored", checkpoint=uri, profile=profile, exact_match=scored.exact_match, val_loss=scored.val_loss,
                 ece=scored.ece, by_level=scored.by_level, regressions=regressions,
                 hard_examples=hard.name if hard else None)
        return record

    # ------------------------------------------------------------------ the confirmation

    async def _confirm(self, path: Path, sha256: str, profile: str, scores: Scores,
                       champion: EvalScored) -> Confirmation | None:
        """The candidate at `path` and `champion` on the confirmation suite, at the levels where the
        candidate is ahead on the selection suite, when it passes the screen there (libs.common.paired);
        else None. Each checkpoint is scored on a confirmation level once (`confirmbook`)."""
        try:
            theirs = champion.item_outcomes()
        except ValueError:
            return None
        if screened(decode_outcomes(scores.outcomes, scores.num_examples), theirs) is None:
            return None
        levels = confirmation_levels(scores.levels, champion.levels)
        if not levels:
            return None
        mine = await self._confirmation_outcomes(sha256, levels, profile, path)
        champion_sha = champion.checkpoint_sha256
        theirs_by_level = await self._confirmation_outcomes(
            champion_sha, levels, self.scorebook.profile_of(champion_sha), None, champion.checkpoint_uri)
        candidate_items = [ok for level in levels for ok in mine[level]]
        champion_items = [ok for level in levels for ok in theirs_by_level[level]]
        confirmation = Confirmation(
            suite_version=self.confirmation_suite.version, champion_sha256=champion_sha, levels=levels,
            num_examples=len(candidate_items), outcomes=encode_outcomes(candidate_items),
            champion_outcomes=encode_outcomes(champion_items),
        )
        log.info("confirmation scored", checkpoint_sha256=sha256, champion_sha256=champion_sha, levels=levels,
                 candidate_right=sum(candidate_items), champion_right=sum(champion_items), items=len(candidate_items))
        return confirmation

    async def _confirmation_outcomes(self, sha256: str, levels: list[str], profile: str, path: Path | None,
                                     uri: str = "") -> dict[str, list[bool]]:
        """`sha256`'s results on the confirmation suite at `levels`, scoring the levels not recorded
        yet (the checkpoint at `path`, or fetched from `uri`)."""
        version = self.confirmation_suite.version
        record = self.confirmbook.get(sha256, version) or ConfirmationRecord(sha256, version)
        missing = [level for level in levels if level not in record.items]
        if missing:
            items = [item for item in self.confirmation_suite.items if item.level_key in missing]
            if path is None:
                async with self._checkpoint(uri, sha256) as fetched:
                    scores = await self._score_on(fetched, items, [], profile)
            else:
                scores = await self._score_on(path, items, [], profile)
            results: dict[str, list[ItemResult]] = {}
            for item, result in zip(items, scores.items):
                results.setdefault(item.level_key, []).append(result)
            record = msgspec.structs.replace(record, items=record.items | results)
            self.confirmbook.save(record)
        return {level: [result.correct for result in record.items[level]] for level in levels}

    @contextlib.asynccontextmanager
    async def _checkpoint(self, uri: str, sha256: str) -> AsyncIterator[Path]:
        """The checkpoint's files while it is scored (ArtifactError for a bad artifact).

        Without a shared disk a checkpoint comes from the object store; that copy is only needed
        while scoring (inference fetches what it serves), so it is removed after, before the score
        goes out (nothing can be loading it from here yet), and does not pile up here.
        """
        fetched = self.store.is_shared(uri) and not self.store.path_for(uri).exists()
        path = await self.store.fetch(uri, sha256)
        try:
            yield path
        finally:
            if fetched:
                await asyncio.to_thread(self.store.remove, uri)
                log.info("fetched copy removed after scoring", checkpoint=uri)

    async def _score_on(self, path: Path, items: list[SuiteItem], probes: list[SuiteItem], profile: str) -> Scores:
        return await asyncio.to_thread(
            score_checkpoint, path, items,
            device=self.device,
            batch_size=self.settings.batch_size,
            max_new_tokens=self.settings.max_new_tokens,
            max_length=self.settings.max_length,
            probes=probes,
            profile=profile,
        )

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
        """Publish the champion's score on this suite whenever its record holds another suite's, the
        base model's while there is no champion, and the champion's sealed test score on this test
        version once."""
        published: set[tuple[str, str]] = set()
        tested: set[tuple[str, str]] = set()
        while not stop.is_set():
            try:
                await self._score_champion(published)
                await self._test_champion(tested)
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

    # ------------------------------------------------------------------ the champion on the sealed test

    async def _test_champion(self, done: set[tuple[str, str]]) -> None:
        """Score the champion on the sealed test suite and publish it, once per (sha256, test version);
        then the champions it replaced (up to TESTED_BACK), so that one replaced before its turn came
        is still tested: a promotion is judged by comparing the two on the same test items."""
        current, _ = await self.champion.read()
        if current is None:
            return
        champions = {current.checkpoint_sha256: current}
        for record in reversed(await self.champion.history()):
            if len(champions) > TESTED_BACK:
                break
            champions.setdefault(record.checkpoint_sha256, record)
        for champion in champions.values():
            await self._test_one(champion, done)

    async def _test_one(self, champion: Champion, done: set[tuple[str, str]]) -> None:
        key = (champion.checkpoint_sha256, self.test_suite.version)
        if key in done:
            return
        try:
            record = self.testbook.get(*key) or await self.test(champion)
        except (nats.errors.Error, TimeoutError):
            raise  # a NATS hiccup: the loop tries again next round
        except Exception as exc:  # noqa: BLE001 - a champion that cannot be tested must not stop the evaluator
            done.add(key)
            log.error("cannot score the champion on the sealed test suite; its numbers stay unreported",
                      checkpoint=champion.checkpoint_uri, test_suite_version=self.test_suite.version, error=repr(exc))
            return
        if not record.published:
            await self.bus.publish(topology.EVAL_TESTED, record.event)  # a NATS error here: tried again next round
            self.testbook.save(msgspec.structs.replace(record, published=True))
        done.add(key)

    async def test(self, champion: Champion) -> ChampionTestRecord:
        """Score the champion on the sealed test suite, asked as its selection score was (its data
        profile), and record it unpublished; raises ArtifactError for a bad artifact."""
        sha256, uri = champion.checkpoint_sha256, champion.checkpoint_uri
        profile = self.scorebook.profile_of(sha256)
        async with self._scoring:
            log.info("scoring the champion on the sealed test suite", checkpoint=uri, run_id=champion.run_id,
                     step=champion.step, test_suite_version=self.test_suite.version)
            async with self._checkpoint(uri, sha256) as path:
                scores = await self._score_on(path, self.test_suite.items, [], profile)
            tested = ChampionTested(
                # The same test always has the same id.
                id=derived_id(NAME, "tested", sha256, self.test_suite.version),
                run_id=champion.run_id,
                step=champion.step,
                checkpoint_uri=uri,
                checkpoint_sha256=sha256,
                suite=self.test_suite.name,
                suite_version=self.test_suite.version,
                **scores.figures(),
                eval_id=champion.eval_id,
                selection_suite_version=champion.suite_version,
            )
            record = ChampionTestRecord(event=tested, items=scores.items, profile=profile)
            self.testbook.save(record)
        log.info("champion tested", checkpoint=uri, test_suite_version=tested.suite_version,
                 exact_match=tested.exact_match, by_level={k: v.accuracy for k, v in tested.levels.items()})
        return record

    # ------------------------------------------------------------------ the base model

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
        Publish(topology.EVAL_TESTED, ChampionTested,
                "evaluator reports each champion's score on the sealed test suite (decides nothing)"),
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted,
                "evaluator submits hard examples: fresh training problems a checkpoint failed (priority low)"),
    ),
    routes=router,
    loops=(Evaluator.keep_champion_scored,),
)
