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
import uuid

import msgspec
import nats.errors

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import CurriculumLevelChanged, DatasetSubmitted, EvalScored, utcnow
from libs.common.http import ServiceMetrics
from libs.common.log import get_logger
from libs.common.runtime import ServiceRuntime, run_service
from libs.common.settings import CommonSettings, SettingsError
from libs.common.skills import binary
from services.curriculum.api import add_routes
from services.curriculum.pacing import IdleTimer, queue_depth
from services.curriculum.progression import LevelChange, SkillState, eval_key, progress
from services.curriculum.state import SkillBoard
from services.curriculum.synthesis import synthetic_dataset

log = get_logger("curriculum")
SKILL = binary.SKILL
LEVEL_NAMESPACE = uuid.UUID("a1f0e6d2-7c3b-4e8a-b5d9-6c2f1e0a9b84")
# The queue: datasets waiting for validation or for training, at any priority.
QUEUE_CONSUMERS = (topology.GATEKEEPER, *topology.TRAINER)


class CurriculumSettings(CommonSettings):
    http_port: int = 0
    # Write synthetic datasets when the queue is idle (level tracking runs regardless).
    enabled: bool = True
    threshold: float = 0.8
    # Evaluations in a row at >= threshold needed to raise the level.
    window: int = 2
    max_level: int = binary.MAX_LEVEL
    poll_interval_s: float = 5.0
    idle_seconds: float = 60.0
    rows_per_dataset: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_level <= binary.MAX_LEVEL:
            raise SettingsError(f"max_level must be 1..{binary.MAX_LEVEL}, got {self.max_level}")
        if self.window < 1 or self.rows_per_dataset < 1 or self.poll_interval_s <= 0 or self.idle_seconds < 0:
            raise SettingsError("window and rows_per_dataset must be >= 1, poll_interval_s > 0, idle_seconds >= 0")
        if not 0.0 < self.threshold <= 1.0:
            raise SettingsError(f"threshold must be in (0, 1], got {self.threshold}")


def level_changed(skill: str, change: LevelChange) -> CurriculumLevelChanged:
    return CurriculumLevelChanged(
        id=change.event_id, time=change.time, skill=skill, previous_level=change.previous_level,
        level=change.level, accuracy=change.accuracy, reason=change.reason,
    )


class Curriculum:
    def __init__(self, bus: Bus, board: SkillBoard, settings: CurriculumSettings, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.board = board
        self.settings = settings
        self.metrics = metrics

    # ------------------------------------------------------------------ progression

    async def handle(self, event: EvalScored, delivery: Delivery) -> None:
        key = eval_key(event.checkpoint_sha256, event.suite_version)
        s = self.settings

        def apply(state: SkillState):
            result = progress(
                state, key, event.by_level, threshold=s.threshold, window=s.window, max_level=s.max_level,
                now=utcnow(), event_id=uuid.uuid5(LEVEL_NAMESPACE, f"{state.skill}:{key}").hex,
            )
            return result.state, result

        result = await self.board.change(SKILL, apply)
        change = result.change
        if result.already_counted:
            # A crash may have come between storing the change and announcing it.
            last = result.state.changes[-1] if result.state.changes else None
            change = last if last and last.eval_key == key else None
        if change:
            await self.bus.publish(topology.CURRICULUM_LEVEL_CHANGED, level_changed(SKILL, change))
            log.info("level changed", skill=SKILL, level=change.level, reason=change.reason)
        else:
            log.info("level kept", skill=SKILL, level=result.state.level, reason=result.reason)
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

        claimed = await self.board.change(SKILL, claim)
        if claimed is None:
            return None
        dataset = await asyncio.to_thread(
            synthetic_dataset, SKILL, claimed.level, claimed.datasets_submitted, self.settings.rows_per_dataset
        )
        await self.bus.publish(topology.DATASET_SUBMITTED, dataset)
        log.info("synthetic dataset submitted", name=dataset.name, rows=len(dataset.rows or []), level=claimed.level)
        return dataset

    async def watch_queue(self, stop: asyncio.Event) -> None:
        """Poll the queue depth; submit a dataset once it has been idle long enough."""
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


async def start(rt: ServiceRuntime[CurriculumSettings]) -> None:
    board = SkillBoard(await rt.bus.kv(topology.CURRICULUM_BUCKET))
    curriculum = Curriculum(rt.bus, board, rt.settings, rt.metrics)
    add_routes(rt.app, board, rt.settings, SKILL)
    rt.spawn(rt.bus.consume(topology.CURRICULUM, EvalScored, curriculum.handle, rt.stop), "consume")
    if rt.settings.enabled:
        rt.spawn(curriculum.watch_queue(rt.stop), "watch-queue")
    else:
        log.info("synthetic data disabled (FLYWHEEL_CURRICULUM_ENABLED=false)")


def main() -> None:
    run_service("curriculum", CurriculumSettings, start)
