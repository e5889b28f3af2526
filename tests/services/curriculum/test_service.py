"""The curriculum on a real bus: synthetic data when the queue idles, level changes after good scores."""

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


async def make_curriculum(bus: Bus) -> Curriculum:
    settings = load_settings(
        CurriculumSettings, "curriculum", environ={}, nats_url="unused",
        idle_seconds=0.5, poll_interval_s=0.1, rows_per_dataset=20,
    )
    return Curriculum(settings, bus, ServiceMetrics("curriculum"), await bus.record(skill_state("binary")))


def scored(sha: str, accuracy: float, level: int = 1) -> EvalScored:
    return EvalScored(
        run_id="r", step=1, checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, suite="binary",
        suite_version="binary-v1-x", exact_match=accuracy, val_loss=1.0, num_examples=10,
        by_level={f"binary/{level}": accuracy},
    )


async def test_idle_queue_gets_one_synthetic_dataset_at_a_time(bus: Bus):
    curriculum = await make_curriculum(bus)
    submitted = await bus.js.subscribe(topology.DATASET_SUBMITTED)
    stop = asyncio.Event()
    watching = asyncio.create_task(curriculum.watch_queue(stop))
    try:
        first = msgspec.json.decode((await submitted.next_msg(timeout=10)).data, type=DatasetSubmitted)
        assert first.name == "curriculum-binary-L1-1" and first.priority == "low" and len(first.rows) == 20
        assert first.channel == "curriculum" and first.submitted_by == "curriculum"

        # Nobody has taken it yet: the queue is not idle, so no second dataset.
        with pytest.raises(nats.errors.TimeoutError):
            await submitted.next_msg(timeout=1.5)

        # The gatekeeper takes it (and nothing follows): the queue idles again.
        gatekeeper = await bus.js.pull_subscribe_bind(topology.GATEKEEPER.durable, topology.GATEKEEPER.stream)
        [msg] = await gatekeeper.fetch(1, timeout=5)
        await msg.ack_sync()
        second = msgspec.json.decode((await submitted.next_msg(timeout=10)).data, type=DatasetSubmitted)
        assert second.name == "curriculum-binary-L1-2" and second.rows != first.rows
    finally:
        stop.set()
        await watching
        await submitted.unsubscribe()
    state, _ = await curriculum.state.read()
    assert state.datasets_submitted == 2


async def test_replicas_claim_each_dataset_once(bus: Bus, nats_server: str):
    other_bus = await Bus.connect([nats_server], "curriculum-2")
    try:
        one, two = await make_curriculum(bus), await make_curriculum(other_bus)
        results = await asyncio.gather(one.submit_synthetic(), two.submit_synthetic())
        assert sum(r is not None for r in results) == 1
        assert (await bus.js.stream_info("DATASETS")).state.messages == 1
    finally:
        await other_bus.close()


async def test_good_scores_raise_the_level_once(bus: Bus):
    curriculum = await make_curriculum(bus)
    changes = await bus.js.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    stop = asyncio.Event()
    consuming = asyncio.create_task(consume(bus, topology.CURRICULUM, EvalScored, curriculum.on_eval_scored, stop))
    try:
        await bus.publish(topology.EVAL_SCORED, scored("a", 0.9))
        await bus.publish(topology.EVAL_SCORED, scored("b", 0.85))
        change = msgspec.json.decode((await changes.next_msg(timeout=10)).data, type=CurriculumLevelChanged)
        assert (change.skill, change.previous_level, change.level) == ("binary", 1, 2)
        assert "level 1 -> 2" in change.reason

        # The deciding score delivered again (new event id, same evaluation): counted once, the
        # announcement repeats with its id and is dropped as a duplicate.
        await bus.publish(topology.EVAL_SCORED, msgspec.structs.replace(scored("b", 0.85), id=new_id()))
        await bus.publish(topology.EVAL_SCORED, scored("c", 0.95, level=2))

        async def level_2_scored():
            state, _ = await curriculum.state.read()
            return state if state.recent == [0.95] else None

        state = await wait_for(level_2_scored, "the level-2 score to be recorded")
    finally:
        stop.set()
        await consuming
        await changes.unsubscribe()
    assert state.level == 2 and len(state.changes) == 1
    assert (await bus.js.stream_info("CURRICULUM")).state.messages == 1
    # Practice data now comes at the new level.
    assert (await curriculum.submit_synthetic()).name == "curriculum-binary-L2-1"

    app = create_app("curriculum", ServiceMetrics("curriculum"), {})
    app.include_router(SERVICE.routes(curriculum))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        levels = (await client.get("/levels")).json()
        assert levels["binary"]["level"] == 2 and levels["binary"]["datasets_submitted"] == 1
        [entry] = (await client.get("/history")).json()
        assert entry["level"] == 2 and entry["event_id"] == change.id
