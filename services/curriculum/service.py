"""Curriculum: raises each skill's level as the model masters it and writes practice data.

Consumes `eval.scored`: applies the progression rule to every practised skill's state in KV
and publishes `curriculum.level_changed` when a level rises. Watches the training queue
(gatekeeper and trainer consumers) and, while fewer than `min_queued` datasets wait there,
publishes a synthetic `dataset.submitted` (priority low, channel curriculum) for the skill
with the fewest datasets so far, at its current level with a review share of the earlier ones.
Run with `python -m services.curriculum`.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import CurriculumLevelChanged, DatasetSubmitted, EvalScored, derived_id, utcnow
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.records import LevelChange, SkillState, skill_state
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
    )


class Curriculum:
    def __init__(self, settings: CurriculumSettings, bus: Bus, metrics: ServiceMetrics,
                 states: dict[str, Record[SkillState]]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        # One record per practised skill, in the order the settings name them.
        self.states = states

    @classmethod
    async def open(cls, rt: ServiceRuntime[CurriculumSettings]) -> Curriculum:
        if not rt.settings.enabled:
            log.info("synthetic data disabled (FLYWHEEL_CURRICULUM_ENABLED=false)")
        states = {skill: await rt.bus.record(skill_state(skill)) for skill in rt.settings.skills}
        return cls(rt.settings, rt.bus, rt.metrics, states)

    async def skill_states(self) -> dict[str, SkillState]:
        """Every practised skill's state; a fresh level-1 state for one never written."""
        return {skill: (await record.read())[0] or SkillState(skill=skill) for skill, record in self.states.items()}

    async def _change(self, skill: str, fn):
        """Apply `fn(state) -> (next state, result)` to `skill` with compare-and-set; the result."""
        return await self.states[skill].change(lambda state, _revision: fn(state or SkillState(skill=skill)))

    # ------------------------------------------------------------------ progression

    async def on_eval_scored(self, event: EvalScored, delivery: Delivery) -> None:
        changed = False
        for skill in self.states:
            changed |= await self._progress(skill, event)
        self.metrics.events_handled.labels(delivery.subject, "level_changed" if changed else "level_kept").inc()

    async def _progress(self, skill: str, event: EvalScored) -> bool:
        key = eval_key(event.checkpoint_sha256, event.suite_version)
        s = self.settings
        top = get_skill(skill).max_level

        def apply(state: SkillState):
            result = progress(
                state, key, event.by_level, threshold=s.threshold, window=s.window, max_level=top,
                now=utcnow(), event_id=derived_id(NAME, "level", state.skill, key),
            )
            return result.state, result

        result = await self._change(skill, apply)
        change = result.change
        if result.already_counted:
            # A crash may have come between storing the change and announcing it.
            last = result.state.changes[-1] if result.state.changes else None
            change = last if last and last.eval_key == key else None
        if change:
            await self.bus.publish(topology.CURRICULUM_LEVEL_CHANGED, level_changed(skill, change))
            log.info("level changed", skill=skill, level=change.level, reason=change.reason)
        else:
            log.info("level kept", skill=skill, level=result.state.level, reason=result.reason)
        return change is not None

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
        Subscribe(topology.EVAL_SCORED, EvalScored, Curriculum.on_eval_scored, consumers=(topology.CURRICULUM,)),
    ),
    publications=(
        Publish(topology.CURRICULUM_LEVEL_CHANGED, CurriculumLevelChanged),
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted, "curriculum publishes synthetic practice datasets"),
    ),
    routes=router,
    loops=(Curriculum.watch_queue,),
)
