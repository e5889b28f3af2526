"""Curriculum: raises skill levels as the model masters them and writes practice data when idle.

Consumes `eval.scored`: applies the progression rule to the skill's state in KV and publishes
`curriculum.level_changed` when the level rises. Watches the training queue (gatekeeper and
trainer consumers) and, once it has been empty for `idle_seconds`, publishes a synthetic
`dataset.submitted` at the skill's current level (priority low, channel curriculum).
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
from libs.common.skills import binary
from services.curriculum.api import router
from services.curriculum.pacing import IdleTimer, queue_depth
from services.curriculum.progression import eval_key, progress
from services.curriculum.settings import CurriculumSettings
from services.curriculum.synthesis import synthetic_dataset

NAME = "curriculum"
log = get_logger(NAME)
# The queue: datasets waiting for validation or for training, at any priority.
QUEUE_CONSUMERS = (topology.GATEKEEPER, *topology.TRAINER)


def level_changed(skill: str, change: LevelChange) -> CurriculumLevelChanged:
    return CurriculumLevelChanged(
        id=change.event_id, time=change.time, skill=skill, previous_level=change.previous_level,
        level=change.level, accuracy=change.accuracy, reason=change.reason,
    )


class Curriculum:
    def __init__(self, settings: CurriculumSettings, bus: Bus, metrics: ServiceMetrics, state: Record[SkillState],
                 skill: str = binary.SKILL) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.state = state
        self.skill = skill

    @classmethod
    async def open(cls, rt: ServiceRuntime[CurriculumSettings]) -> Curriculum:
        if not rt.settings.enabled:
            log.info("synthetic data disabled (FLYWHEEL_CURRICULUM_ENABLED=false)")
        return cls(rt.settings, rt.bus, rt.metrics, await rt.bus.record(skill_state(binary.SKILL)))

    async def skill_state(self) -> SkillState:
        """The skill's state; a fresh level-1 state if never written."""
        state, _ = await self.state.read()
        return state or SkillState(skill=self.skill)

    async def _change(self, fn):
        """Apply `fn(state) -> (next state, result)` with compare-and-set; the result."""
        return await self.state.change(lambda state, _revision: fn(state or SkillState(skill=self.skill)))

    # ------------------------------------------------------------------ progression

    async def on_eval_scored(self, event: EvalScored, delivery: Delivery) -> None:
        key = eval_key(event.checkpoint_sha256, event.suite_version)
        s = self.settings

        def apply(state: SkillState):
            result = progress(
                state, key, event.by_level, threshold=s.threshold, window=s.window, max_level=s.max_level,
                now=utcnow(), event_id=derived_id(NAME, "level", state.skill, key),
            )
            return result.state, result

        result = await self._change(apply)
        change = result.change
        if result.already_counted:
            # A crash may have come between storing the change and announcing it.
            last = result.state.changes[-1] if result.state.changes else None
            change = last if last and last.eval_key == key else None
        if change:
            await self.bus.publish(topology.CURRICULUM_LEVEL_CHANGED, level_changed(self.skill, change))
            log.info("level changed", skill=self.skill, level=change.level, reason=change.reason)
        else:
            log.info("level kept", skill=self.skill, level=result.state.level, reason=result.reason)
        self.metrics.events_handled.labels(delivery.subject, "level_changed" if change else "level_kept").inc()

    # ------------------------------------------------------------------ synthetic data

    async def current_depth(self) -> int:
        infos = [await self.bus.js.consumer_info(spec.stream, spec.durable) for spec in QUEUE_CONSUMERS]
        return queue_depth(infos)

    async def submit_synthetic(self) -> DatasetSubmitted | None:
        """Claim the next dataset number in KV and publish that dataset; None if another replica just did."""
        now = utcnow()

        def claim(state: SkillState):
            if state.last_submitted_at and (now - state.last_submitted_at).total_seconds() < self.settings.idle_seconds:
                return state, None
            claimed = msgspec.structs.replace(
                state, datasets_submitted=state.datasets_submitted + 1, last_submitted_at=now
            )
            return claimed, claimed

        claimed = await self._change(claim)
        if claimed is None:
            return None
        dataset = await asyncio.to_thread(
            synthetic_dataset, self.skill, claimed.level, claimed.datasets_submitted, self.settings.rows_per_dataset
        )
        await self.bus.publish(topology.DATASET_SUBMITTED, dataset)
        log.info("synthetic dataset submitted", name=dataset.name, rows=len(dataset.rows or []), level=claimed.level)
        return dataset

    async def watch_queue(self, stop: asyncio.Event) -> None:
        """Poll the queue depth; submit a dataset once it has been idle long enough."""
        if not self.settings.enabled:
            return
        timer = IdleTimer(self.settings.idle_seconds)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if timer.observe(await self.current_depth(), loop.time()):
                    await self.submit_synthetic()
                    timer.restart()
            except (nats.errors.Error, TimeoutError) as exc:
                # A NATS hiccup (reconnecting, consumer being recreated): skip this poll and
                # start the idle count over. Anything else is a bug and crashes the loop.
                log.warning("queue watch failed; retrying", error=repr(exc))
                timer.restart()
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
