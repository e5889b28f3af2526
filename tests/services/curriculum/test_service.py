"""The curriculum on a real bus: practice while the queue runs low, level changes on the champion's scores."""

from __future__ import annotations

import asyncio
import contextlib

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
    ModelDeployed,
    new_id,
)
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CHAMPION, Champion, LevelChange, SkillState, skill_state
from libs.common.settings import load_settings
from services.curriculum.progression import eval_key
from services.curriculum.service import SERVICE, Curriculum
from services.curriculum.settings import CurriculumSettings
from tests.conftest import consume, wait_for
from tests.services.conftest import running
from tests.services.curriculum.champions import champion, rolled_back_to

pytestmark = pytest.mark.integration


async def make_curriculum(bus: Bus, skills=("binary",), **overrides) -> Curriculum:
    values = {"nats_url": "unused", "skills": list(skills), "poll_interval_s": 0.1, "rows_per_dataset": 20}
    settings = load_settings(CurriculumSettings, "curriculum", environ={}, **{**values, **overrides})
    states = {skill: await bus.record(skill_state(skill)) for skill in skills}
    return Curriculum(settings, bus, ServiceMetrics("curriculum"), states, await bus.record(CHAMPION))


async def crown(bus: Bus, record: Champion, *, announce: bool = True) -> ModelDeployed:
    """What the deployer does once a champion is final: write the record, announce it."""
    await (await bus.record(CHAMPION)).put(record)
    event = record.announcement()
    if announce:
        await bus.publish(topology.MODEL_DEPLOYED, event)
    return event


async def counted(curriculum: Curriculum, record: Champion, skill: str = "binary") -> SkillState | None:
    """`skill`'s state once `record`'s score is counted (announcements made), else None."""
    state = (await curriculum.skill_states())[skill]
    done = eval_key(record.checkpoint_sha256, record.suite_version) in state.champion_scores
    return state if done and all(c.announced for c in state.changes) else None


async def changes_so_far(sub) -> list[CurriculumLevelChanged]:
    """The level changes delivered to `sub` (a core subscription) until it has been quiet a moment."""
    found = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except nats.errors.TimeoutError:
            return found
        found.append(msgspec.json.decode(msg.data, type=CurriculumLevelChanged))


def scored(name: str, correct: int) -> EvalScored:
    """An evaluation of checkpoint `name` on the selection suite, `correct` of 48 right at binary/1."""
    record = champion(name, {1: correct})
    return EvalScored(
        run_id=record.run_id, step=1, checkpoint_uri=record.checkpoint_uri, checkpoint_sha256=record.checkpoint_sha256,
        suite="binary", suite_version=record.suite_version, exact_match=correct / 48, val_loss=1.0, num_examples=48,
        by_level={"binary/1": correct / 48}, levels=record.levels,
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


async def all_handled(bus: Bus) -> bool:
    """Every champion change published so far is handled and acked by the curriculum's consumer."""
    info = await bus.js.consumer_info(topology.CURRICULUM.stream, topology.CURRICULUM.durable)
    return info.delivered.stream_seq > 0 and info.num_pending == 0 and info.num_ack_pending == 0


@contextlib.asynccontextmanager
async def following_champions(bus: Bus, curriculum: Curriculum):
    """The curriculum's durable consumer of champion changes, running while the block runs."""
    stop = asyncio.Event()
    handler = curriculum.on_model_deployed
    consuming = asyncio.create_task(consume(bus, topology.CURRICULUM, ModelDeployed, handler, stop))
    try:
        yield
    finally:
        stop.set()
        await consuming


async def test_an_evaluation_of_a_checkpoint_that_is_not_the_champion_never_raises_a_level(
        bus: Bus, nats_server: str, tmp_path):
    # The declared service itself: it does not consume evaluations at all.
    assert [s.subject for s in SERVICE.subscriptions] == [topology.MODEL_DEPLOYED]
    settings = load_settings(CurriculumSettings, "curriculum", environ={}, enabled=False, nats_url=nats_server,
                             data_dir=str(tmp_path / "data"))
    changes = await bus.nc.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    async with running(SERVICE, settings) as curriculum:
        # A perfect score for a checkpoint the deployer never promoted...
        await bus.publish(topology.EVAL_SCORED, scored("x", 48))
        # ...and a champion change to a weak champion: once that is counted, the level stands.
        weak = champion("w", {1: 5})
        await crown(bus, weak)
        state = await wait_for(lambda: counted(curriculum, weak), "the champion's score to be counted")
        assert state.level == 1 and state.changes == [] and state.recent == [5 / 48]
        assert await changes_so_far(changes) == []

        # The same perfect score once its checkpoint is the champion: now it counts.
        promoted = champion("x", {1: 48})
        await crown(bus, promoted)
        state = await wait_for(lambda: counted(curriculum, promoted), "the new champion's score to be counted")
    assert state.level == 2 and [c.checkpoint_sha256 for c in state.changes] == [promoted.checkpoint_sha256]
    assert [(c.previous_level, c.level) for c in await changes_so_far(changes)] == [(1, 2)]


async def test_a_champion_at_the_threshold_raises_the_level_and_names_its_evidence(bus: Bus):
    curriculum = await make_curriculum(bus, skills=("binary", "syllo"), review_fraction=0.25)
    changes = await bus.js.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    strong = champion("a", {1: 40, 2: 3})
    async with following_champions(bus, curriculum):
        base = champion("b", {1: 5, 2: 0})
        await crown(bus, base)
        await wait_for(lambda: counted(curriculum, base), "the base champion's score to be counted")
        await crown(bus, strong)
        change = msgspec.json.decode((await changes.next_msg(timeout=10)).data, type=CurriculumLevelChanged)
        # Below the bar at level 2: kept.
        weaker = champion("c", {1: 46, 2: 20})
        await crown(bus, weaker)
        state = await wait_for(lambda: counted(curriculum, weaker), "the next champion's score to be counted")
    assert (change.skill, change.previous_level, change.level) == ("binary", 1, 2)
    assert (change.checkpoint_sha256, change.run_id, change.suite_version) == (
        strong.checkpoint_sha256, "run-a", strong.suite_version)
    assert change.score == strong.levels["binary/1"] and change.accuracy == 40 / 48
    assert "binary/1 40/48 = 0.83 [0.70, 0.91]" in change.reason and "level 1 -> 2" in change.reason
    assert state.level == 2 and state.recent == [20 / 48] and len(state.changes) == 1
    assert (await bus.js.stream_info("CURRICULUM")).state.messages == 1
    # SYLLO has its own level: the champion's record holds no SYLLO score.
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
        assert entry["checkpoint_sha256"] == strong.checkpoint_sha256 and entry["score"]["correct"] == 40


async def test_a_redelivered_champion_change_counts_once(bus: Bus):
    # Two scores in a row at the bar raise the level: a champion counted twice would.
    curriculum = await make_curriculum(bus, window=2)
    a = champion("a", {1: 44})
    async with following_champions(bus, curriculum):
        await crown(bus, a)
        await wait_for(lambda: counted(curriculum, a), "the champion's score to be counted")
        # Delivered again past JetStream's duplicate window (a new message), and re-announced by the
        # deployer after rewriting the same record (same id: dropped as a duplicate).
        await bus.publish(topology.MODEL_DEPLOYED, msgspec.structs.replace(a.announcement(), id=new_id()))
        await crown(bus, a)
        await wait_for(lambda: all_handled(bus), "the redeliveries to be handled")
        state = (await curriculum.skill_states())["binary"]
        assert state.level == 1 and state.recent == [44 / 48] and len(state.champion_scores) == 1

        b = champion("b", {1: 42})
        await crown(bus, b)
        state = await wait_for(lambda: counted(curriculum, b), "the second champion's score to be counted")
    assert state.level == 2 and [c.checkpoint_sha256 for c in state.changes] == [b.checkpoint_sha256]
    assert (await bus.js.stream_info("CURRICULUM")).state.messages == 1


async def test_a_rollback_to_a_weaker_champion_does_not_lower_the_level(bus: Bus):
    curriculum = await make_curriculum(bus)
    weak, strong = champion("w", {1: 10, 2: 0}), champion("s", {1: 44, 2: 12})
    async with following_champions(bus, curriculum):
        for record in (weak, strong):
            await crown(bus, record)
            await wait_for(lambda record=record: counted(curriculum, record), "the champion's score to be counted")
        assert (await curriculum.skill_states())["binary"].level == 2
        await crown(bus, rolled_back_to(weak, strong))
        # The restored champion rescored on a new suite: a new score, and a weak one.
        rescored = rolled_back_to(champion("w", {1: 11, 2: 1}, suite="binary-v2-y"), strong)
        await crown(bus, rescored)
        state = await wait_for(lambda: counted(curriculum, rescored), "the rescore to be counted")
    assert state.level == 2 and len(state.changes) == 1 and state.recent == [1 / 48]
    assert (await bus.js.stream_info("CURRICULUM")).state.messages == 1


async def test_champion_scores_recorded_while_the_curriculum_was_away_count_in_order(bus: Bus):
    curriculum = await make_curriculum(bus)
    changes = await bus.nc.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    # A promotion the curriculum has not handled yet, then its rescore on a new suite (which the
    # deployer records without an announcement).
    first = champion("a", {1: 44, 2: 10})
    event = await crown(bus, first, announce=False)
    rescored = champion("a", {1: 44, 2: 42}, suite="binary-v2-y")
    await crown(bus, rescored, announce=False)
    await bus.publish(topology.MODEL_DEPLOYED, event)
    async with following_champions(bus, curriculum):
        state = await wait_for(lambda: counted(curriculum, rescored), "both scores to be counted")
    assert state.level == 3
    assert [(c.previous_level, c.level, c.suite_version) for c in await changes_so_far(changes)] == [
        (1, 2, first.suite_version), (2, 3, "binary-v2-y")]


async def test_a_change_stored_but_never_announced_is_announced_by_the_redelivery(bus: Bus):
    curriculum = await make_curriculum(bus)
    changes = await bus.nc.subscribe(topology.CURRICULUM_LEVEL_CHANGED)
    a = champion("a", {1: 44})
    # A crash came between storing the change and publishing it: the record says so.
    stored_change = LevelChange(
        time=a.deployed_at, previous_level=1, level=2, accuracy=44 / 48, reason="binary/1 44/48", event_id="change-a",
        eval_key=eval_key(a.checkpoint_sha256, a.suite_version), checkpoint_sha256=a.checkpoint_sha256, announced=False,
    )
    await (await bus.record(skill_state("binary"))).put(SkillState(
        skill="binary", level=2, champion_scores=[stored_change.eval_key], changes=[stored_change]))
    async with following_champions(bus, curriculum):
        await crown(bus, a)  # the message it was handling, delivered again
        state = await wait_for(lambda: counted(curriculum, a), "the change to be announced")
    assert [c.id for c in await changes_so_far(changes)] == ["change-a"]
    assert state.level == 2 and state.changes == [msgspec.structs.replace(stored_change, announced=True)]
