"""Curriculum: raises each skill's level as the served model masters it and writes practice data.

Levels are judged by the champion alone (`services.curriculum.progression`), never by every
evaluation: a checkpoint that was scored but never promoted says nothing about what is served.
The trigger is `model.deployed` (a durable consumer): the deployer announces every final champion
change with it, promotions, manual deploys and rollbacks alike, only once the champion record in
KV (`libs.common.records.CHAMPION`) holds the new champion. The event is only the cue: the scores
are read from the record's kept history, oldest first, and every champion score not yet counted
is applied in order. So nothing depends on when the curriculum runs: a stale or redelivered
announcement counts nothing twice, champions recorded while the curriculum was down are caught
up, and a rescore on a new suite (which the deployer records without an event) is counted at the
next announcement. Not `eval.scored`, counted when its checkpoint is the champion at that moment:
that races the deployer, which may not have decided yet. Not a watch of the KV key: a loop on
every replica, outside the declared subscriptions, that would need this history replay after a
restart all the same.

Each skill's state changes by compare-and-set; a level change is stored unannounced, published
as `curriculum.level_changed` (its id derived from the skill and the champion score), then
marked announced, so a crash in between is made good by the redelivery.

Watches the training queue (gatekeeper and trainer consumers) and, while fewer than `min_queued`
datasets wait there, publishes a synthetic `dataset.submitted` (priority low, channel curriculum)
for the skill with the fewest datasets so far, at its current level with a review share of the
earlier ones. Run with `python -m services.curriculum`.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import CurriculumLevelChanged, DatasetSubmitted, ModelDeployed, derived_id, utcnow
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.records import CHAMPION, Champion, LevelChange, SkillState, skill_state
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from libs.common.skills import get_skill
from services.curriculum.api import router
from services.curriculum.pacing import datasets_due, queue_depth
from services.curriculum.progression import eval_key, progress
from services.curriculum.settings import CurriculumSettings
from services.curriculum.synthesis import synthetic_dataset

NAME = "curriculum"
log = get_logger(NAME)


def level_changed(skill: str, change: LevelChange) -> CurriculumLevelChanged:
    return CurriculumLevelChanged(
        id=change.event_id, time=change.time, skill=skill, previous_level=change.previous_level,
        level=change.level, accuracy=change.accuracy, reason=change.reason,
        checkpoint_sha256=change.checkpoint_sha256, run_id=change.run_id, suite_version=change.suite_version,
        score=change.score,
    )


class Curriculum:
    def __init__(self, settings: CurriculumSettings, bus: Bus, metrics: ServiceMetrics,
                 states: dict[str, Record[SkillState]], champion: Record[Champion]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        # One record per practised skill, in the order the settings name them.
        self.states = states
        # The deployer's champion record: read only.
        self.champion = champion

    @classmethod
    async def open(cls, rt: ServiceRuntime[CurriculumSettings]) -> Curriculum:
        if not rt.settings.enabled:
            log.info("synthetic data disabled (FLYWHEEL_CURRICULUM_ENABLED=false)")
        states = {skill: await rt.bus.record(skill_state(skill)) for skill in rt.settings.skills}
        return cls(rt.settings, rt.bus, rt.metrics, states, await rt.bus.record(CHAMPION))

    async def skill_states(self) -> dict[str, SkillState]:
        """Every practised skill's state; a fresh level-1 state for one never written."""
        return {skill: (await record.read())[0] or SkillState(skill=skill) for skill, record in self.states.items()}

    async def _change(self, skill: str, fn):
        """Apply `fn(state) -> (next state, result)` to `skill` with compare-and-set; the result."""
        return await self.states[skill].change(lambda state, _revision: fn(state or SkillState(skill=skill)))

    # ------------------------------------------------------------------ progression

    async def on_model_deployed(self, event: ModelDeployed, delivery: Delivery) -> None:
        # Every champion score the bucket still keeps, oldest first (the current one last).
        scores = await self.champion.history()
        changed = False
        for skill in self.states:
            changed |= await self._progress(skill, scores)
        log.info("champion change handled", announced=event.checkpoint_sha256, champion_scores=len(scores))
        self.metrics.events_handled.labels(delivery.subject, "level_changed" if changed else "level_kept").inc()

    async def _progress(self, skill: str, scores: list[Champion]) -> bool:
        """Count every champion score in `scores` not yet counted for `skill`, in order; announce
        what changed."""
        s = self.settings
        top = get_skill(skill).max_level

        def apply(state: SkillState):
            reasons = []
            for champion in scores:
                key = eval_key(champion.checkpoint_sha256, champion.suite_version)
                result = progress(state, champion, threshold=s.threshold, window=s.window, max_level=top,
                                  now=utcnow(), event_id=derived_id(NAME, "level", skill, key))
                if not result.already_counted:
                    reasons.append(result.reason)
                state = result.state
            return state, (state, reasons)

        state, reasons = await self._change(skill, apply)
        for reason in reasons:
            log.info("champion score counted", skill=skill, level=state.level, reason=reason)
        return bool(await self._announce(skill))

    async def _announce(self, skill: str) -> list[LevelChange]:
        """Publish `skill`'s stored level changes not yet announced, then mark them announced."""
        state, _ = await self.states[skill].read()
        pending = [c for c in state.changes if not c.announced] if state else []
        for change in pending:
            await self.bus.publish(topology.CURRICULUM_LEVEL_CHANGED, level_changed(skill, change))
            log.info("level changed", skill=skill, level=change.level, reason=change.reason)
        if pending:
            done = {c.event_id for c in pending}

            def mark(state: SkillState):
                changes = [msgspec.structs.replace(c, announced=True) if c.event_id in done else c
                           for c in state.changes]
                return msgspec.structs.replace(state, changes=changes), None

            await self._change(skill, mark)
        return pending

    # ------------------------------------------------------------------ synthetic data

    async def current_depth(self) -> int:
        infos = [await self.bus.js.consumer_info(spec.stream, spec.durable) for spec in topology.QUEUE]
        return queue_depth(infos)

    async def submit_synthetic(self) -> DatasetSubmitted:
        """Publish the next practice dataset of the skill that has had the fewest so far."""
        states = await self.skill_states()
        skill = min(self.states, key=lambda name: states[name].datasets_submitted)

        def claim(state: SkillState):
            # The counter numbers the dataset (and seeds it): replicas never write the same one.
            claimed = msgspec.structs.replace(
                state, datasets_submitted=state.datasets_submitted + 1, last_submitted_at=utcnow()
            )
            return claimed, claimed

        claimed = await self._change(skill, claim)
        dataset = await asyncio.to_thread(
            synthetic_dataset, skill, claimed.level, claimed.datasets_submitted, self.settings.rows_per_dataset,
            self.settings.review_fraction,
        )
        await self.bus.publish(topology.DATASET_SUBMITTED, dataset)
        log.info("synthetic dataset submitted", name=dataset.name, rows=len(dataset.rows or []), level=claimed.level)
        return dataset

    async def watch_queue(self, stop: asyncio.Event) -> None:
        """Poll the queue depth; write practice while it is below `min_queued`."""
        if not self.settings.enabled:
            return
        while not stop.is_set():
            try:
                for _ in range(datasets_due(await self.current_depth(), self.settings.min_queued)):
                    await self.submit_synthetic()
            except (nats.errors.Error, TimeoutError) as exc:
                # A NATS hiccup (reconnecting, consumer being recreated): skip this poll.
                # Anything else is a bug and crashes the loop.
                log.warning("queue watch failed; retrying", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)


SERVICE = Service(
    name=NAME,
    settings=CurriculumSettings,
    build=Curriculum.open,
    subscriptions=(
        Subscribe(topology.MODEL_DEPLOYED, ModelDeployed, Curriculum.on_model_deployed,
                  consumers=(topology.CURRICULUM,),
                  summary="curriculum consumes (durable curriculum-champion): the champion record's new "
                          "selection-suite scores count toward its skills' levels"),
    ),
    publications=(
        Publish(topology.CURRICULUM_LEVEL_CHANGED, CurriculumLevelChanged),
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted, "curriculum publishes synthetic practice datasets"),
    ),
    routes=router,
    loops=(Curriculum.watch_queue,),
)
