"""The deployer on a real bus: eval.scored -> a decision (champion in KV + model.deployed when
promoted), decisions kept with their reasons, CAS under races, suite changes, manual deploy and
rollback over NATS request/reply."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest
from nats.aio.msg import Msg

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import (
    DeployCheckpoint,
    DeployReply,
    ModelDeployed,
    ModelRolledBack,
    RollBackDeployment,
    new_id,
)
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CHAMPION, DEPLOY_DECISIONS
from libs.common.settings import load_settings
from services.deployer.service import SERVICE, Deployer
from services.deployer.settings import DeployerSettings
from tests.conftest import wait_for
from tests.services.conftest import running
from tests.services.deployer.candidates import base, better, scored

pytestmark = pytest.mark.integration

BASE = base(40)


def settings_for(nats_url: str, **overrides) -> DeployerSettings:
    return load_settings(DeployerSettings, "deployer", environ={}, nats_url=nats_url, **overrides)


async def make_deployer(bus: Bus) -> Deployer:
    return Deployer(settings_for("unused"), bus, ServiceMetrics("deployer"), await bus.record(CHAMPION),
                    await bus.record(DEPLOY_DECISIONS))


def delivery(bus: Bus) -> Delivery:
    """What the consume loop hands a handler, for calling handlers side by side."""
    return Delivery(Msg(bus.nc, subject=topology.EVAL_SCORED, data=b""), topology.DEPLOYER)


async def deployed_events(bus: Bus) -> list[ModelDeployed]:
    info = await bus.js.stream_info("MODELS")
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("MODELS", seq)
        if msg.subject == topology.MODEL_DEPLOYED:
            events.append(msgspec.json.decode(msg.data, type=ModelDeployed))
    return events if info.state.messages else []


async def decisions(bus: Bus) -> list:
    kept, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
    return kept.decisions if kept else []


async def handled(bus: Bus, count: int) -> None:
    """Wait until the deployer's consumer has settled `count` scores."""
    async def settled() -> bool:
        info = await bus.js.consumer_info(topology.DEPLOYER.stream, topology.DEPLOYER.durable)
        return info.ack_floor.consumer_seq >= count and info.num_ack_pending == 0
    await wait_for(settled, f"the deployer to settle {count} scores")


def routes(deployer: Deployer) -> httpx.AsyncClient:
    app = create_app("deployer", ServiceMetrics("deployer"), {})
    app.include_router(SERVICE.routes(deployer))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_scores_promote_only_gains_beyond_the_noise_and_every_decision_is_kept(bus: Bus, nats_server: str):
    deployed = await bus.js.subscribe(topology.MODEL_DEPLOYED)
    async with running(SERVICE, settings_for(nats_server, max_loss_rise=0.15)) as deployer:
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        first = msgspec.json.decode((await deployed.next_msg(timeout=10)).data, type=ModelDeployed)
        assert first.checkpoint_sha256 == "a" * 64 and "first champion" in first.reason

        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 3), val_loss=0.1))  # p = 0.125: kept
        # The champion's score again (the evaluator republishing it after the duplicate window).
        await bus.publish(topology.EVAL_SCORED, msgspec.structs.replace(scored("a", BASE), id=new_id()))
        await bus.publish(topology.EVAL_SCORED, scored("c", better(BASE, 8), val_loss=1.5))  # up 50%: kept
        await bus.publish(topology.EVAL_SCORED, scored("d", better(BASE, 6)))  # p = 0.016: promoted
        second = msgspec.json.decode((await deployed.next_msg(timeout=10)).data, type=ModelDeployed)
        assert second.checkpoint_sha256 == "d" * 64 and second.previous_checkpoint_uri == first.checkpoint_uri
        assert "p = 0.0156 <= alpha 0.05" in second.reason
        await handled(bus, 5)

        async with routes(deployer) as client:
            served = (await client.get("/decisions")).json()
            assert (await client.get("/decisions", params={"limit": 1})).json() == served[:1]

    assert [(d["outcome"], d["checkpoint_sha256"][0]) for d in served] == [
        ("promoted", "d"), ("kept", "c"), ("kept", "b"), ("promoted", "a")]  # newest first; a's repeat is no decision
    assert "right where the champion is wrong on 3 and wrong where it is right on 0" in served[2]["reason"]
    assert "p = 0.1250 > alpha 0.05" in served[2]["reason"]
    assert "val loss 1.5000 vs 1.0000: up 50.0% (more than 15%)" in served[1]["reason"]
    assert served[0]["champion_sha256"] == "a" * 64
    champion, _ = await (await bus.record(CHAMPION)).read()
    assert champion.checkpoint_sha256 == "d" * 64 and champion.event_id == second.id
    assert champion.outcomes == scored("d", better(BASE, 6)).outcomes  # what the next candidate is paired with
    # The re-announcement of "a" carried a's original id: JetStream dropped it.
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["a", "d"]


async def test_settings_tune_the_rule(bus: Bus, nats_server: str):
    async with running(SERVICE, settings_for(nats_server, alpha=0.2, max_loss_rise=1.0)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 3), val_loss=1.5))  # p = 0.125 <= 0.2
        await handled(bus, 2)
    assert [d.outcome for d in await decisions(bus)] == ["promoted", "promoted"]


async def test_racing_deployers_never_both_win(bus: Bus, nats_server: str):
    other_bus = await Bus.connect([nats_server], "deployer-2")
    wide = base(100)
    try:
        one, two = await make_deployer(bus), await make_deployer(other_bus)
        # Eight equally good candidates at once: whoever writes first wins, the rest are the same on every item.
        await asyncio.gather(*[
            (one if i % 2 else two).on_eval_scored(scored(chr(ord("a") + i), wide), delivery(bus)) for i in range(8)
        ])
        history = await one.champion.history()
        assert len(history) == 1
        assert len(await deployed_events(bus)) == 1

        # Rising candidates at once: every write must beat the one it replaced, the best ends up champion.
        await asyncio.gather(*[
            (one if i % 2 else two).on_eval_scored(scored(chr(ord("k") + i), better(wide, 6 * (i + 1))), delivery(bus))
            for i in range(8)
        ])
        history = await one.champion.history()
        scores = [c.exact_match for c in history]
        assert scores == sorted(scores) and len(set(scores)) == len(scores)
        assert history[-1].checkpoint_sha256 == "r" * 64
        assert len(await deployed_events(bus)) == len(history)
        assert len(await decisions(bus)) == 16  # every decision kept once, whichever replica made it
    finally:
        await other_bus.close()


async def test_rollback_restores_the_previous_champion_and_bars_its_run(bus: Bus):
    deployer = await make_deployer(bus)
    for sha, gained in (("a", 0), ("b", 6), ("c", 12)):
        await deployer.on_eval_scored(scored(sha, better(BASE, gained)), delivery(bus))
    rolled = await bus.js.subscribe(topology.MODEL_ROLLED_BACK)
    async with routes(deployer) as client:
        assert (await client.get("/champion")).json()["checkpoint_sha256"] == "c" * 64
        assert (await client.post("/rollback", params={"requested_by": "test"})).json()["checkpoint_sha256"] == "b" * 64
        event = msgspec.json.decode((await rolled.next_msg(timeout=5)).data, type=ModelRolledBack)
        assert event.checkpoint_sha256 == "b" * 64 and event.rolled_back_from == "file:///ckpt/c"
        assert (await client.post("/rollback")).json()["checkpoint_sha256"] == "a" * 64
        assert (await client.post("/rollback")).status_code == 409
        history = (await client.get("/history")).json()
        assert [h["checkpoint_sha256"][0] for h in history] == ["a", "b", "c", "b", "a"]
        assert history[0]["kind"] == "rollback" and history[0]["rolled_back_runs"] == ["run-c", "run-b"]
        latest = (await client.get("/decisions")).json()[0]
        assert latest["outcome"] == "rolled_back" and "run run-b is never promoted again" in latest["reason"]
    await rolled.unsubscribe()  # a subscription with unread messages would stall the bus drain

    # c's run is barred for good, however much better its next checkpoint is.
    await deployer.on_eval_scored(scored("e", better(BASE, 20), run_id="run-c"), delivery(bus))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "a" * 64
    refused = (await decisions(bus))[-1]
    assert refused.outcome == "refused" and "run run-c was rolled back" in refused.reason
    # The restored champion's score is what the next candidate must beat.
    await deployer.on_eval_scored(scored("d", better(BASE, 5)), delivery(bus))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "d" * 64
    assert (await deployed_events(bus))[-1].checkpoint_sha256 == "d" * 64


async def test_a_new_suite_waits_for_the_champions_rescore(bus: Bus):
    deployer = await make_deployer(bus)
    await deployer.on_eval_scored(scored("a", BASE, suite_version="binary-v1-old"), delivery(bus))
    await deployer.on_eval_scored(scored("b", better(BASE, 10)), delivery(bus))
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "a" * 64
    kept = (await decisions(bus))[-1]
    assert kept.outcome == "kept" and kept.reason.startswith("champion not yet scored on suite binary-v1-aaaaaaaaaaaa")

    # The evaluator scores the champion on the new suite: recorded, nothing new announced.
    await deployer.on_eval_scored(scored("a", better(BASE, 2)), delivery(bus))
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "a" * 64 and champion.suite_version == scored("a").suite_version
    assert champion.outcomes == scored("a", better(BASE, 2)).outcomes
    assert (await decisions(bus))[-1].outcome == "rescored"
    assert len(await deployed_events(bus)) == 1
    # Now the new suite's candidates compare with it item by item.
    await deployer.on_eval_scored(scored("c", better(BASE, 8)), delivery(bus))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "c" * 64


async def test_manual_deploy_and_rollback_over_nats(bus: Bus, nats_server: str):
    async with running(SERVICE, settings_for(nats_server)):
        await bus.publish(topology.EVAL_SCORED, scored("o", BASE, suite_version="binary-v1-old"))  # first champion
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))  # kept: o has no score on this suite
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 2)))  # kept, likewise
        await handled(bus, 3)

        async def deploy(checkpoint: str) -> DeployReply:
            return await bus.request(topology.CONTROL_DEPLOYER_DEPLOY, DeployCheckpoint(checkpoint=checkpoint,
                                     requested_by="test"), DeployReply, timeout=10)

        async def rollback() -> DeployReply:
            return await bus.request(topology.CONTROL_DEPLOYER_ROLLBACK, RollBackDeployment(requested_by="test"),
                                     DeployReply, timeout=10)

        refused = await deploy("c" * 64)
        assert not refused.ok and refused.state == "refused"
        assert "has not been scored on the current suite binary-v1-aaaaaaaaaaaa (never scored)" in refused.message
        refused = await deploy("file:///ckpt/o")
        assert not refused.ok and "scored only on binary-v1-old" in refused.message

        promoted = await deploy("b" * 64)
        assert promoted.ok and promoted.state == "promoted" and promoted.checkpoint_uri == "file:///ckpt/b"
        assert "the champion has no score on suite binary-v1-aaaaaaaaaaaa to compare with" in promoted.message
        again = await deploy("file:///ckpt/b")
        assert again.ok and again.state == "already_champion"
        # The operator's call, even for a worse checkpoint; the reason says how it compares.
        worse = await deploy("file:///ckpt/a")
        assert worse.ok and worse.state == "promoted" and "wrong where it is right on 2" in worse.message

        back = await rollback()
        assert back.ok and back.state == "rolled_back" and back.checkpoint_sha256 == "b" * 64
        assert (await rollback()).checkpoint_sha256 == "o" * 64
        nothing = await rollback()
        assert not nothing.ok and nothing.state == "refused" and "no earlier champion" in nothing.message

    kept = await decisions(bus)
    assert [d.outcome for d in kept] == ["promoted", "kept", "kept", "refused", "refused", "promoted", "promoted",
                                         "rolled_back", "rolled_back"]
    assert kept[3].checkpoint_sha256 == "c" * 64 and kept[4].checkpoint_uri == "file:///ckpt/o"
    assert {d.requested_by for d in kept[3:]} == {"test"}
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["o", "b", "a", "b", "o"]
