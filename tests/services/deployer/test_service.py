"""The deployer on a real bus: eval.scored -> champion in KV + model.deployed, CAS under races, rollback."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest
from nats.aio.msg import Msg

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import EvalScored, ModelDeployed, ModelRolledBack
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CHAMPION
from libs.common.settings import load_settings
from services.deployer.service import SERVICE, Deployer
from services.deployer.settings import DeployerSettings
from tests.services.conftest import running

pytestmark = pytest.mark.integration

SUITE = "binary-v1-aaaaaaaaaaaa"


def scored(sha: str, exact_match: float, val_loss: float = 1.0) -> EvalScored:
    return EvalScored(
        run_id="r", step=1, checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, suite="binary",
        suite_version=SUITE, exact_match=exact_match, val_loss=val_loss, num_examples=10,
    )


async def make_deployer(bus: Bus) -> Deployer:
    settings = load_settings(DeployerSettings, "deployer", environ={}, nats_url="unused")
    return Deployer(settings, bus, ServiceMetrics("deployer"), await bus.record(CHAMPION))


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


async def test_scores_promote_only_improvements(bus: Bus, nats_server: str):
    deployed = await bus.js.subscribe(topology.MODEL_DEPLOYED)
    settings = load_settings(DeployerSettings, "deployer", environ={}, nats_url=nats_server)
    async with running(SERVICE, settings):
        await bus.publish(topology.EVAL_SCORED, scored("a", 0.5))
        first = msgspec.json.decode((await deployed.next_msg(timeout=10)).data, type=ModelDeployed)
        assert first.checkpoint_sha256 == "a" * 64 and "first champion" in first.reason

        await bus.publish(topology.EVAL_SCORED, scored("b", 0.4, val_loss=0.1))  # worse: kept
        await bus.publish(topology.EVAL_SCORED, scored("a", 0.5))  # the champion's score again
        await bus.publish(topology.EVAL_SCORED, scored("c", 0.5, val_loss=0.5))  # tie, lower loss: promoted
        second = msgspec.json.decode((await deployed.next_msg(timeout=10)).data, type=ModelDeployed)
        assert second.checkpoint_sha256 == "c" * 64 and second.previous_checkpoint_uri == first.checkpoint_uri

    champion, _ = await (await bus.record(CHAMPION)).read()
    assert champion.checkpoint_sha256 == "c" * 64 and champion.event_id == second.id
    # The re-announcement of "a" carried a's original id: JetStream dropped it.
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["a", "c"]


async def test_racing_deployers_never_both_win(bus: Bus, nats_server: str):
    other_bus = await Bus.connect([nats_server], "deployer-2")
    try:
        one, two = await make_deployer(bus), await make_deployer(other_bus)
        # Eight equally good candidates at once: whoever writes first wins, the rest see a tie.
        await asyncio.gather(*[
            (one if i % 2 else two).on_eval_scored(scored(chr(ord("a") + i), 0.5), delivery(bus)) for i in range(8)
        ])
        history = await one.champion.history()
        assert len(history) == 1
        assert len(await deployed_events(bus)) == 1

        # Rising candidates at once: every write must beat the one it replaced, the best ends up champion.
        await asyncio.gather(*[
            (one if i % 2 else two).on_eval_scored(scored(chr(ord("k") + i), 0.6 + i / 100), delivery(bus)) for i in range(8)
        ])
        history = await one.champion.history()
        scores = [c.exact_match for c in history]
        assert scores == sorted(scores) and len(set(scores)) == len(scores)
        assert history[-1].checkpoint_sha256 == "r" * 64
        assert len(await deployed_events(bus)) == len(history)
    finally:
        await other_bus.close()


async def test_rollback_restores_the_previous_champion(bus: Bus):
    deployer = await make_deployer(bus)
    for sha, em in (("a", 0.2), ("b", 0.4), ("c", 0.6)):
        await deployer.on_eval_scored(scored(sha, em), delivery(bus))
    rolled = await bus.js.subscribe(topology.MODEL_ROLLED_BACK)
    app = create_app("deployer", ServiceMetrics("deployer"), {})
    app.include_router(SERVICE.routes(deployer))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/champion")).json()["checkpoint_sha256"] == "c" * 64
        assert (await client.post("/rollback", params={"requested_by": "test"})).json()["checkpoint_sha256"] == "b" * 64
        event = msgspec.json.decode((await rolled.next_msg(timeout=5)).data, type=ModelRolledBack)
        assert event.checkpoint_sha256 == "b" * 64 and event.rolled_back_from == "file:///ckpt/c"
        assert (await client.post("/rollback")).json()["checkpoint_sha256"] == "a" * 64
        assert (await client.post("/rollback")).status_code == 409
        history = (await client.get("/history")).json()
        assert [h["checkpoint_sha256"][0] for h in history] == ["a", "b", "c", "b", "a"]
        assert history[0]["kind"] == "rollback"
    await rolled.unsubscribe()  # a subscription with unread messages would stall the bus drain
    # The rolled-back champion's score is what the next candidate must beat.
    await deployer.on_eval_scored(scored("d", 0.3), delivery(bus))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "d" * 64
    assert (await deployed_events(bus))[-1].checkpoint_sha256 == "d" * 64
