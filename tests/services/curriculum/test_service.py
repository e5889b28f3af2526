"""The curriculum on a real bus: practice while the queue runs low, level changes after good scores."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import nats.errors
import pytest

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import (
    CurriculumLevelChanged,
    DatasetSubmitted,
    EvalScored,
    new_id,
)
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import skill_state
from libs.common.settings import load_settings
from services.curriculum.service import SERVICE, Curriculum
from services.curriculum.settings import CurriculumSettings
from tests.conftest import consume, wait_for

pytestmark = pytest.mark.integration


async def make_curriculum(bus: Bus, skills=("binary",), **overrides) -> Curriculum:
    values = {"nats_url": "unused", "skills": list(skills), "poll_interval_s": 0.1, "rows_per_dataset": 20}
    settings = load_settings(CurriculumSettings, "curriculum", environ={}, **{**values, **overrides})
    states = {skill: await bus.record(skill_state(skill)) for skill in skills}
    return Curriculum(settings, bus, ServiceMetrics("curriculum"), states)


def scored(sha: str, accuracy: float, level: int = 1, skill: str = "binary") -> EvalScored:
    return EvalScored(
        run_id="r", step=1, checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, suite="binary",
        suite_version="binary-v1-x", exact_match=accuracy, val_loss=1.0, num_examples=10,
        by_level={f"{skill}/{level}": accuracy},
    )


async def next_dataset(sub) -> DatasetSubmitted:
    return msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=DatasetSubmitted)


async def test_practice_keeps_two_datasets_queued_and_no_more(bus: Bus):
    curriculum = await make_curriculum(bus)
    submitted = await bus.js.subscribe(topology.DATASET_SUBMITTED)
    stop = asyncio.Event()
    watching = asyncio.create_task(curriculum.watch_queue(stop))
    try:
        first, second = await next_dataset(submitted), await next_dataset(submitted)
        assert (first.name, second.name) == ("curriculum-binary-L1-1", "curriculum-binary-L1-2")
        assert first.priority == "low" and len(first.rows) == 20 and first.rows != second.rows
        assert first.channel == "curriculum" and first.submitted_by == "curriculum"

        # Two are queued (nobody has taken them): nothing more is written.
        with pytest.raises(nats.errors.TimeoutError):
            await submitted.next_msg(timeout=1.5)

        # The gatekeeper takes one (and acks it): the queue runs low again, one more follows.
        gatekeeper = await bus.js.pull_subscribe_bind(topology.GATEKEEPER.durable, topology.GATEKEEPER.stream)
        [msg] = await gatekeeper.fetch(1, timeout=5)
        await msg.ack_sync()
        assert (await next_dataset(submitted)).name == "curriculum-binary-L1-3"
        with pytest.raises(nats.errors.TimeoutError):
            await submitted.next_msg(timeout=1.5)
    finally:
        stop.set()
        await watching
        await submitted.unsubscribe()
    assert (await curriculum.skill_states())["binary"].datasets_submitted == 3


async def test_each_skill_gets_its_turn_at_its_own_level(bus: Bus):
    curriculum = await make_curriculum(bus, skills=("binary", "syllo"), rows_per_dataset=8)
    names = [(await curriculum.submit_synthetic()).name for _ in range(4)]
    assert names == ["curriculum-binary-L1-1", "curriculum-syllo-L1-1", "curriculum-binary-L1-2",
                     "curriculum-syllo-L1-2"]


async def test_replicas_never_write_the_same_dataset(bus: Bus, nats_server: str):
    other_bus = await Bus.connect([nats_server], "curriculum-2")
    try:
        one, two = await make_curriculum(bus), await make_curriculum(other_bus)
        results = await asyncio.gather(one.submit_synthetic(), two.submit_synthetic())
        assert {r.name for r in results} == {"curriculum-binary-L1-1", "curriculum-binary-L1-2"}
        assert (await bus.js.stream_info("DATASETS")).state.messages == 2
    finally:
        await other_bus.close()


async def test_good_scores_of_distinct_checkpoints_raise_the_level_once(bus: Bus):
    curriculum = await make_curriculum(bus, skills=("binary", "syllo"), review_fraction=0.25)
    changes = await bus.js.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    stop = asyncio.Event()
    consuming = asyncio.create_task(consume(bus, topology.CURRICULUM, EvalScored, curriculum.on_eval_scored, stop))
    try:
        await bus.publish(topology.EVAL_SCORED, scored("a", 0.9))
        await bus.publish(topology.EVAL_SCORED, scored("b", 0.85))
        # Two checkpoints at >= 80 % are not yet three: no change.
        with pytest.raises(nats.errors.TimeoutError):
            await changes.next_msg(timeout=1.0)
        await bus.publish(topology.EVAL_SCORED, scored("c", 0.8))
        change = msgspec.json.decode((await changes.next_msg(timeout=10)).data, type=CurriculumLevelChanged)
        assert (change.skill, change.previous_level, change.level) == ("binary", 1, 2)
        assert "level 1 -> 2" in change.reason

        # The deciding score delivered again (new event id, same evaluation): counted once, the
        # announcement repeats with its id and is dropped as a duplicate.
        await bus.publish(topology.EVAL_SCORED, msgspec.structs.replace(scored("c", 0.8), id=new_id()))
        await bus.publish(topology.EVAL_SCORED, scored("d", 0.95, level=2))

        async def level_2_scored():
            state = (await curriculum.skill_states())["binary"]
            return state if state.recent == [0.95] else None

        state = await wait_for(level_2_scored, "the level-2 score to be recorded")
    finally:
        stop.set()
        await consuming
        await changes.unsubscribe()
    assert state.level == 2 and len(state.changes) == 1
    assert (await bus.js.stream_info("CURRICULUM")).state.messages == 1
    # SYLLO has its own level, untouched by Binary's scores.
    assert (await curriculum.skill_states())["syllo"].level == 1
    # Practice now comes at the new level, with a quarter reviewing level 1.
    practice = await curriculum.submit_synthetic()
    assert practice.name == "curriculum-binary-L2-1" and len(practice.rows) == 20

    app = create_app("curriculum", ServiceMetrics("curriculum"), {})
    app.include_router(SERVICE.routes(curriculum))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        levels = (await client.get("/levels")).json()
        assert levels["binary"]["level"] == 2 and levels["binary"]["datasets_submitted"] == 1
        assert levels["binary"]["max_level"] == 7 and levels["syllo"]["level"] == 1
        [entry] = (await client.get("/history")).json()
        assert entry["level"] == 2 and entry["event_id"] == change.id and entry["skill"] == "binary"
