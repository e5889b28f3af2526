"""The deployer on a real bus: eval.scored -> a decision; a promotion, manual deploy or rollback is
staged (model.staged) and becomes the champion (KV + model.deployed) only once a replica reports
serving it (model.serving); a failed load, a timeout or a newer deployment fails it
(model.deploy_failed) and the champion stays. Decisions kept with their reasons, CAS under races,
suite changes, restarts, manual deploy and rollback over NATS request/reply."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

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
    ModelDeployFailed,
    ModelRolledBack,
    ModelStaged,
    RollBackDeployment,
    new_id,
    utcnow,
)
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CANDIDATES_TESTED, CHAMPION, DEPLOY_DECISIONS, DEPLOYMENT
from libs.common.settings import load_settings
from services.deployer.confirmation import served
from services.deployer.service import SERVICE, Deployer
from services.deployer.settings import DeployerSettings
from tests.conftest import wait_for
from tests.services.conftest import running
from tests.services.deployer.candidates import SUITE, base, better, confirmed, scored
from tests.services.deployer.replica import (
    confirm,
    newest,
    replica,
    report,
    serving_delivery,
    settled,
)

pytestmark = pytest.mark.integration

BASE = base(40)


def settings_for(nats_url: str, **overrides) -> DeployerSettings:
    return load_settings(DeployerSettings, "deployer", environ={}, nats_url=nats_url, **overrides)


async def make_deployer(bus: Bus) -> Deployer:
    return Deployer(settings_for("unused"), bus, ServiceMetrics("deployer"), await bus.record(CHAMPION),
                    await bus.record(DEPLOY_DECISIONS), await bus.record(DEPLOYMENT), await bus.record(CANDIDATES_TESTED))


def delivery(bus: Bus) -> Delivery:
    """What the consume loop hands a handler, for calling handlers side by side."""
    return Delivery(Msg(bus.nc, subject=topology.EVAL_SCORED, data=b""), topology.DEPLOYER)


async def promote(deployer: Deployer, score) -> None:
    """A score through the deployer's handler and, when it stages the checkpoint, a replica serving it."""
    before = await newest(deployer.bus)
    await deployer.on_eval_scored(score, delivery(deployer.bus))
    after = await newest(deployer.bus)
    if after is not None and after.state == "staged" and after != before:
        await confirm(deployer)


async def events_on(bus: Bus, subject: str, kind: type) -> list:
    info = await bus.js.stream_info("MODELS")
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("MODELS", seq)
        if msg.subject == subject:
            events.append(msgspec.json.decode(msg.data, type=kind))
    return events if info.state.messages else []


async def deployed_events(bus: Bus) -> list[ModelDeployed]:
    return await events_on(bus, topology.MODEL_DEPLOYED, ModelDeployed)


async def failed_events(bus: Bus) -> list[ModelDeployFailed]:
    return await events_on(bus, topology.MODEL_DEPLOY_FAILED, ModelDeployFailed)


async def decisions(bus: Bus) -> list:
    kept, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
    return kept.decisions if kept else []


async def decided(bus: Bus, count: int) -> list:
    """Wait until `count` decisions are kept; they, oldest first."""
    async def enough() -> list | None:
        kept = await decisions(bus)
        return kept if len(kept) >= count else None
    return await wait_for(enough, f"{count} decisions")


async def champion_sha(bus: Bus) -> str:
    current, _ = await (await bus.record(CHAMPION)).read()
    return current.checkpoint_sha256 if current else ""


async def champion_is(bus: Bus, sha256: str) -> None:
    async def served_now() -> bool:
        return await champion_sha(bus) == sha256
    await wait_for(served_now, f"{sha256[:8]} to be the champion")


async def handled(bus: Bus, count: int, spec: topology.ConsumerSpec = topology.DEPLOYER) -> None:
    """Wait until the deployer's consumer (of scores, or of serving reports) has settled `count` messages."""
    async def settled_messages() -> bool:
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        return info.ack_floor.consumer_seq >= count and info.num_ack_pending == 0
    await wait_for(settled_messages, f"the deployer to settle {count} messages from {spec.durable}")


async def next_event(sub, kind: type, timeout: float = 10):
    return msgspec.json.decode((await sub.next_msg(timeout=timeout)).data, type=kind)


def routes(deployer: Deployer) -> httpx.AsyncClient:
    app = create_app("deployer", ServiceMetrics("deployer"), {})
    app.include_router(SERVICE.routes(deployer))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# ---------------------------------------------------------------------------- deciding


async def test_scores_promote_only_gains_beyond_the_noise_and_every_decision_is_kept(bus: Bus, nats_server: str):
    deployed = await bus.js.subscribe(topology.MODEL_DEPLOYED)
    async with running(SERVICE, settings_for(nats_server, max_loss_rise=0.15)) as deployer, replica(bus):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        first = await next_event(deployed, ModelDeployed)
        assert first.checkpoint_sha256 == "a" * 64 and "first champion" in first.reason

        # p = 0.125 on the selection suite: not past the screen, kept, no confirmation spent.
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 3), val_loss=0.1))
        # The champion's score again (the evaluator republishing it after the duplicate window).
        await bus.publish(topology.EVAL_SCORED, msgspec.structs.replace(scored("a", BASE), id=new_id()))
        await bus.publish(topology.EVAL_SCORED, scored("c", better(BASE, 8), val_loss=1.5))  # up 50%: kept
        # Past the screen, and on the confirmation suite p = 0.002: the first confirmation against "a"
        # is tested at alpha_1 = 0.025.
        await bus.publish(topology.EVAL_SCORED, scored("d", better(BASE, 9)))
        second = await next_event(deployed, ModelDeployed)
        assert second.checkpoint_sha256 == "d" * 64 and second.previous_checkpoint_uri == first.checkpoint_uri
        assert "confirmation 1 against this champion: tested at alpha_1 = 0.025" in second.reason
        assert "p = 0.0020 <= alpha_1 0.025" in second.reason
        await handled(bus, 5)
        await decided(bus, 4)

        async with routes(deployer) as client:
            served_decisions = (await client.get("/decisions")).json()
            assert (await client.get("/decisions", params={"limit": 1})).json() == served_decisions[:1]
            assert (await client.get("/deployment")).json()["state"] == "served"

    assert [(d["outcome"], d["checkpoint_sha256"][0]) for d in served_decisions] == [
        ("promoted", "d"), ("kept", "c"), ("kept", "b"), ("promoted", "a")]  # newest first; a's repeat is no decision
    assert "right where the champion is wrong on 3 and wrong where it is right on 0" in served_decisions[2]["reason"]
    assert "p = 0.1250 > 0.01" in served_decisions[2]["reason"] and "no confirmation spent" in served_decisions[2]["reason"]
    assert "val loss 1.5000 vs 1.0000: up 50.0% (more than 15%)" in served_decisions[1]["reason"]
    assert "no confirmation spent" in served_decisions[1]["reason"]
    assert served_decisions[0]["champion_sha256"] == "a" * 64
    assert served_decisions[0]["reason"].endswith("; served by test-replica")
    champion, _ = await (await bus.record(CHAMPION)).read()
    assert champion.checkpoint_sha256 == "d" * 64 and champion.event_id == second.id
    assert champion.outcomes == scored("d", better(BASE, 9)).outcomes  # what the next candidate is paired with
    tested, _ = await (await bus.record(CANDIDATES_TESTED)).read()
    # One confirmation was numbered against "a" (the screen and the regression guard kept the others
    # before any); none yet against "d", whose count starts afresh.
    assert (tested.champion_event_id, tested.count) == (first.id, 1)
    assert len(await (await bus.record(CHAMPION)).history()) == 2  # one value per champion, none per test
    # The re-announcement of "a" carried a's original id: JetStream dropped it.
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["a", "d"]


async def test_settings_tune_the_rule(bus: Bus, nats_server: str):
    async with running(SERVICE, settings_for(nats_server, alpha=0.3, max_loss_rise=1.0)), replica(bus):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        await settled(bus)
        # Past the screen (p = 0.0078); confirmed on 4 of 4 (p = 0.0625) at alpha_1 = 0.3/2, not at 0.05/2.
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 7), val_loss=1.5,
                                                       confirmation=confirmed(better(BASE, 4), BASE)))
        await champion_is(bus, "b" * 64)
        await decided(bus, 2)
    assert [d.outcome for d in await decisions(bus)] == ["promoted", "promoted"]
    assert await champion_sha(bus) == "b" * 64


async def test_racing_deployers_never_both_win(bus: Bus, nats_server: str):
    other_bus = await Bus.connect([nats_server], "deployer-2")
    wide = base(100)
    try:
        one, two = await make_deployer(bus), await make_deployer(other_bus)
        # Eight equally good first candidates at once: each is staged in turn; the last one stands and
        # every one it replaced fails with a reason.
        await asyncio.gather(*[
            (one if i % 2 else two).on_eval_scored(scored(chr(ord("a") + i), wide), delivery(bus)) for i in range(8)
        ])
        standing = await newest(bus)
        assert standing.state == "staged" and standing.replaced == []
        failures = await failed_events(bus)
        assert len(failures) == 7 and standing.id not in {f.deployment_id for f in failures}
        assert all(f.reason.startswith("replaced by deployment") for f in failures)
        assert await champion_sha(bus) == "" and await deployed_events(bus) == []

        # Both deployers take the same report at once (a redelivery): one champion change, one announcement.
        ok = report(standing)
        await asyncio.gather(one.on_model_serving(ok, serving_delivery(bus)),
                             two.on_model_serving(ok, serving_delivery(other_bus)))
        assert len(await one.champion.history()) == 1 and await champion_sha(bus) == standing.checkpoint_sha256
        assert len(await deployed_events(bus)) == 1
        assert sorted(d.outcome for d in await decisions(bus)) == ["deploy_failed"] * 7 + ["promoted"]

        # A failure and a confirmation of the next deployment at once: exactly one of them wins.
        await one.on_eval_scored(scored("k", better(wide, 12), against=standing.checkpoint_sha256[0], champion_correct=wide),
                                 delivery(bus))
        contested = await newest(bus)
        await asyncio.gather(
            one.on_model_serving(report(contested, ok=False, sha256="", reason="out of memory"), serving_delivery(bus)),
            two.on_model_serving(report(contested), serving_delivery(other_bus)),
        )
        outcome = await newest(bus)
        assert outcome.settled and outcome.state in ("served", "failed")
        won = outcome.state == "served"
        assert await champion_sha(bus) == ("k" * 64 if won else standing.checkpoint_sha256)
        assert len(await deployed_events(bus)) == 1 + won and len(await failed_events(bus)) == 7 + (not won)
        assert len(await decisions(bus)) == 9  # every decision kept once, whichever replica made it
    finally:
        await other_bus.close()


async def test_each_confirmation_spends_alpha_once_against_its_champion(bus: Bus):
    deployer, other = await make_deployer(bus), await make_deployer(bus)
    await promote(deployer, scored("a", BASE))
    # Seven more right (p = 0.0078): past the screen; confirmed on 4 of 4 (p = 0.0625): not at any alpha_j.
    def unconfirmed(sha: str):
        return scored(sha, better(BASE, 7), confirmation=confirmed(better(BASE, 4), BASE))

    b = unconfirmed("b")
    await deployer.on_eval_scored(b, delivery(bus))
    await deployer.on_eval_scored(b, delivery(bus))  # a redelivery: the same decision, kept once
    # The same checkpoint and suite scored again (republished under a new id): still confirmation 1.
    await deployer.on_eval_scored(msgspec.structs.replace(b, id=new_id()), delivery(bus))
    await deployer.on_eval_scored(unconfirmed("c"), delivery(bus))
    # Not past the screen: no number spent.
    await deployer.on_eval_scored(scored("z", better(BASE, 1)), delivery(bus))
    # Two deployers deciding at once never give two confirmations one number.
    await asyncio.gather(*[(deployer if i % 2 else other).on_eval_scored(unconfirmed(sha), delivery(bus))
                           for i, sha in enumerate("defghijk")])
    champion, _ = await deployer.champion.read()
    tested, _ = await deployer.candidates.read()
    assert champion.checkpoint_sha256 == "a" * 64 and (tested.champion_event_id, tested.count) == (champion.event_id, 10)
    assert tested.keys[:2] == [f"{'b' * 64}@{SUITE}", f"{'c' * 64}@{SUITE}"]
    kept = (await decisions(bus))[1:]
    numbers = [int(found.group(1)) if (found := re.search(r"confirmation (\d+) against", d.reason)) else 0 for d in kept]
    assert numbers[:4] == [1, 1, 2, 0] and sorted(numbers[4:]) == list(range(3, 11))
    # The eleventh is tested at alpha_11 = 0.05/132: p = 0.0002 is promoted, and the count restarts.
    await promote(deployer, scored("l", better(BASE, 12)))
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "l" * 64
    assert "confirmation 11 against this champion" in (await decisions(bus))[-1].reason
    await promote(deployer, scored("b", better(BASE, 19), against="l", champion_correct=better(BASE, 12)))
    assert "confirmation 1 against this champion" in (await decisions(bus))[-1].reason


async def test_a_new_suite_waits_for_the_champions_rescore(bus: Bus):
    deployer = await make_deployer(bus)
    await promote(deployer, scored("a", BASE, suite_version="binary-v1-old"))
    await promote(deployer, scored("b", better(BASE, 10)))
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "a" * 64
    kept = (await decisions(bus))[-1]
    assert kept.outcome == "kept" and kept.reason.startswith("champion not yet scored on suite binary-v1-aaaaaaaaaaaa")

    # The evaluator scores the champion on the new suite: recorded, nothing new announced or staged.
    await promote(deployer, scored("a", better(BASE, 2)))
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "a" * 64 and champion.suite_version == scored("a").suite_version
    assert champion.outcomes == scored("a", better(BASE, 2)).outcomes
    assert (await decisions(bus))[-1].outcome == "rescored"
    assert len(await deployed_events(bus)) == 1
    # Now the new suite's candidates compare with it item by item.
    await promote(deployer, scored("c", better(BASE, 10)))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "c" * 64


# ---------------------------------------------------------------------------- confirmation


async def test_the_champion_changes_only_once_a_replica_serves_the_staged_checkpoint(bus: Bus, nats_server: str):
    staged_sub = await bus.js.subscribe(topology.MODEL_STAGED)
    deployed_sub = await bus.js.subscribe(topology.MODEL_DEPLOYED)
    async with running(SERVICE, settings_for(nats_server)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        staged = await next_event(staged_sub, ModelStaged)
        assert (staged.kind, staged.checkpoint_sha256) == ("promotion", "a" * 64) and "first champion" in staged.reason
        assert staged.deadline - staged.time < timedelta(seconds=121)
        await handled(bus, 1)
        assert await champion_sha(bus) == "" and await decisions(bus) == [] and await deployed_events(bus) == []

        # Stale reports change nothing: another deployment's, and a replica serving another checkpoint.
        await bus.publish(topology.MODEL_SERVING, msgspec.structs.replace(report(staged), deployment_id="unknown"))
        await bus.publish(topology.MODEL_SERVING, report(staged, sha256="f" * 64))
        await handled(bus, 2, topology.DEPLOYER_SERVING)
        assert await champion_sha(bus) == "" and (await newest(bus)).state == "staged"

        # The report that the staged sha256 is served makes it final.
        await bus.publish(topology.MODEL_SERVING, report(staged))
        deployed = await next_event(deployed_sub, ModelDeployed)
        assert deployed.checkpoint_sha256 == "a" * 64 and await champion_sha(bus) == "a" * 64
        done = await settled(bus, staged.deployment_id)
        assert (done.state, done.served_by) == ("served", "test-replica")
        [decision] = await decided(bus, 1)
        assert decision.outcome == "promoted" and decision.reason.endswith("; served by test-replica")


async def test_a_replica_that_cannot_load_it_fails_the_deployment_and_the_champion_stays(bus: Bus, nats_server: str):
    failed_sub = await bus.js.subscribe(topology.MODEL_DEPLOY_FAILED)
    async with running(SERVICE, settings_for(nats_server)):
        async with replica(bus):
            await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
            await settled(bus)
        async with replica(bus, ok=False, reason="checkpoint sha256 does not match") as seen:
            await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 10)))
            failure = await next_event(failed_sub, ModelDeployFailed)
        [staged] = seen
        assert (failure.deployment_id, failure.checkpoint_sha256) == (staged.deployment_id, "b" * 64)
        assert failure.reason == "replica test-replica could not serve it: checkpoint sha256 does not match"
        await settled(bus, staged.deployment_id)
        assert await champion_sha(bus) == "a" * 64

        # Too late: a replica that did load it cannot revive it.
        await bus.publish(topology.MODEL_SERVING, report(staged, replica="late"))
        await handled(bus, 3, topology.DEPLOYER_SERVING)
        assert await champion_sha(bus) == "a" * 64
        assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["a"]
    kept = await decisions(bus)
    assert [d.outcome for d in kept] == ["promoted", "deploy_failed"]
    assert kept[1].reason.startswith("replica test-replica could not serve it: checkpoint sha256 does not match; "
                                     "staged because: past the screen on the selection suite")


async def test_no_report_in_time_fails_the_deployment(bus: Bus, nats_server: str):
    failed_sub = await bus.js.subscribe(topology.MODEL_DEPLOY_FAILED)
    async with running(SERVICE, settings_for(nats_server, confirm_timeout_s=1.0)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        failure = await next_event(failed_sub, ModelDeployFailed, timeout=30)
        assert failure.checkpoint_sha256 == "a" * 64
        assert failure.reason == "no inference replica reported serving it within 1 s"
        await settled(bus, failure.deployment_id)
        assert await champion_sha(bus) == ""
        # In time, the same checkpoint is served.
        async with replica(bus):
            await bus.publish(topology.EVAL_SCORED, msgspec.structs.replace(scored("a", BASE), id=new_id()))
            await wait_for(lambda: champion_sha(bus), "the champion")
    assert [d.outcome for d in await decided(bus, 2)] == ["deploy_failed", "promoted"]
    assert await champion_sha(bus) == "a" * 64


async def test_a_newer_deployment_replaces_a_staged_one(bus: Bus, nats_server: str):
    staged_sub = await bus.js.subscribe(topology.MODEL_STAGED)
    failed_sub = await bus.js.subscribe(topology.MODEL_DEPLOY_FAILED)
    async with running(SERVICE, settings_for(nats_server)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        first = await next_event(staged_sub, ModelStaged)
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 4)))  # no champion yet: also the first
        second = await next_event(staged_sub, ModelStaged)
        replaced = await next_event(failed_sub, ModelDeployFailed)
        assert replaced.deployment_id == first.deployment_id
        assert replaced.reason.startswith(f"replaced by deployment {second.deployment_id} (promotion of file:///ckpt/b)")
        # The replaced one's report is stale; the newest one's makes it final.
        await bus.publish(topology.MODEL_SERVING, report(first))
        await bus.publish(topology.MODEL_SERVING, report(second))
        await settled(bus, second.deployment_id)
    assert await champion_sha(bus) == "b" * 64
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["b"]
    assert [(d.outcome, d.checkpoint_sha256[0]) for d in await decisions(bus)] == [("deploy_failed", "a"),
                                                                                  ("promoted", "b")]


async def test_a_restarted_deployer_resumes_a_staged_deployment(bus: Bus, nats_server: str):
    staged_sub = await bus.js.subscribe(topology.MODEL_STAGED)
    async with running(SERVICE, settings_for(nats_server)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        staged = await next_event(staged_sub, ModelStaged)
    # The deployer is down when the replica reports: the durable consumer keeps the report for it.
    await bus.publish(topology.MODEL_SERVING, report(staged))
    assert await champion_sha(bus) == ""
    async with running(SERVICE, settings_for(nats_server)):
        await settled(bus, staged.deployment_id)
    assert await champion_sha(bus) == "a" * 64 and [d.outcome for d in await decisions(bus)] == ["promoted"]

    # A deadline outlives the deployer too: it is the staged record's, whatever the next one's setting.
    async with running(SERVICE, settings_for(nats_server, confirm_timeout_s=3.0)):
        await bus.publish(topology.EVAL_SCORED, scored("b", better(BASE, 10)))
        pending = await next_event(staged_sub, ModelStaged)
    assert (await newest(bus)).state == "staged"
    async with running(SERVICE, settings_for(nats_server)):
        timed_out = await settled(bus, pending.deployment_id)
    assert timed_out.state == "failed" and timed_out.reason == "no inference replica reported serving it within 3 s"
    assert await champion_sha(bus) == "a" * 64


async def test_a_restarted_deployer_finishes_a_deployment_a_crash_interrupted(bus: Bus, nats_server: str):
    staged_sub = await bus.js.subscribe(topology.MODEL_STAGED)
    async with running(SERVICE, settings_for(nats_server)):
        await bus.publish(topology.EVAL_SCORED, scored("a", BASE))
        staged = await next_event(staged_sub, ModelStaged)
    # A crash after the report was accepted, before the champion record was written.
    record = await bus.record(DEPLOYMENT)
    await record.change(lambda current, _revision: (served(current, "host-1", utcnow()), None))
    assert await champion_sha(bus) == ""
    async with running(SERVICE, settings_for(nats_server)):
        await settled(bus, staged.deployment_id)
        await wait_for(lambda: decisions(bus), "the decision")
    assert await champion_sha(bus) == "a" * 64
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["a"]
    assert [d.outcome for d in await decisions(bus)] == ["promoted"]


async def test_a_served_deployment_never_overwrites_a_champion_it_was_not_weighed_against(bus: Bus):
    deployer = await make_deployer(bus)
    await promote(deployer, scored("a", BASE))
    await deployer.on_eval_scored(scored("b", better(BASE, 10)), delivery(bus))  # staged, against a
    # Behind its back (a racing replica, a hand edit) another checkpoint became the champion...
    record = await bus.record(CHAMPION)
    current, _ = await record.read()
    await record.put(msgspec.structs.replace(current, checkpoint_uri="file:///ckpt/c", checkpoint_sha256="c" * 64,
                                             event_id="elsewhere"))
    # ...and a report of serving b was accepted before the deployer could write the champion record.
    await (await bus.record(DEPLOYMENT)).change(lambda d, _revision: (served(d, "host-1", utcnow()), None))
    await deployer.settle()
    outcome = await newest(bus)
    assert outcome.state == "failed" and outcome.settled
    assert outcome.reason.startswith("the champion changed while it was staged: file:///ckpt/c is served")
    assert await champion_sha(bus) == "c" * 64
    assert [f.checkpoint_sha256[0] for f in await failed_events(bus)] == ["b"]
    assert (await decisions(bus))[-1].outcome == "deploy_failed"


# ---------------------------------------------------------------------------- rollback and manual deploy


async def test_rollback_is_staged_then_restores_the_previous_champion_and_bars_its_run(bus: Bus):
    deployer = await make_deployer(bus)
    for sha, gained, against in (("a", 0, None), ("b", 7, ("a", 0)), ("c", 14, ("b", 7))):
        champion_sha, champion_gained = against or ("a", 0)
        await promote(deployer, scored(sha, better(BASE, gained), against=champion_sha,
                                       champion_correct=better(BASE, champion_gained)))
    rolled = await bus.js.subscribe(topology.MODEL_ROLLED_BACK)
    async with routes(deployer) as client:
        assert (await client.get("/champion")).json()["checkpoint_sha256"] == "c" * 64
        staged = (await client.post("/rollback", params={"requested_by": "test"})).json()
        assert staged["state"] == "staged" and staged["checkpoint_sha256"] == "b" * 64
        # Nothing changes until a replica serves it; asking again meanwhile is the same deployment.
        assert (await client.get("/champion")).json()["checkpoint_sha256"] == "c" * 64
        assert (await client.post("/rollback")).json()["deployment_id"] == staged["deployment_id"]
        assert (await client.get("/deployment")).json()["state"] == "staged"
        await confirm(deployer)
        event = await next_event(rolled, ModelRolledBack, timeout=5)
        assert event.checkpoint_sha256 == "b" * 64 and event.rolled_back_from == "file:///ckpt/c"
        assert (await client.post("/rollback")).json()["checkpoint_sha256"] == "a" * 64
        await confirm(deployer)
        assert (await client.post("/rollback")).status_code == 409
        history = (await client.get("/history")).json()
        assert [h["checkpoint_sha256"][0] for h in history] == ["a", "b", "c", "b", "a"]
        assert history[0]["kind"] == "rollback" and history[0]["rolled_back_runs"] == ["run-c", "run-b"]
        latest = (await client.get("/decisions")).json()[0]
        assert latest["outcome"] == "rolled_back" and "run run-b is never promoted again" in latest["reason"]
    await rolled.unsubscribe()  # a subscription with unread messages would stall the bus drain

    # c's run is barred for good, however much better its next checkpoint is.
    await promote(deployer, scored("e", better(BASE, 20), run_id="run-c"))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "a" * 64
    refused = (await decisions(bus))[-1]
    assert refused.outcome == "refused" and "run run-c was rolled back" in refused.reason
    # The restored champion's score is what the next candidate is paired with, the first against
    # it; but a rollback keeps the best levels so far (c's: 1.0 and 0.7), which bound its levels.
    await promote(deployer, scored("f", better(BASE, 10)))
    kept = (await decisions(bus))[-1]
    assert kept.outcome == "kept" and "no confirmation spent" in kept.reason
    assert (f"below the best champion so far on suite {SUITE}: binary/2 accuracy 0.500 vs 0.700: down 20.0 points "
            "(more than 5)") in kept.reason
    await promote(deployer, scored("d", better(BASE, 14)))
    assert (await deployer.champion.read())[0].checkpoint_sha256 == "d" * 64
    assert (await deployed_events(bus))[-1].checkpoint_sha256 == "d" * 64


async def test_a_rollback_that_no_replica_serves_keeps_the_champion_and_its_run(bus: Bus):
    deployer = await make_deployer(bus)
    for sha, gained in (("a", 0), ("b", 7)):
        await promote(deployer, scored(sha, better(BASE, gained)))
    await deployer.rollback("test")
    failed = await confirm(deployer, ok=False, sha256="b" * 64, reason="out of memory")
    assert failed.state == "failed" and failed.settled
    champion, _ = await deployer.champion.read()
    assert champion.checkpoint_sha256 == "b" * 64 and champion.rolled_back_runs == []
    assert (await decisions(bus))[-1].outcome == "deploy_failed"
    assert await events_on(bus, topology.MODEL_ROLLED_BACK, ModelRolledBack) == []


async def test_manual_deploy_and_rollback_over_nats(bus: Bus, nats_server: str):
    async with running(SERVICE, settings_for(nats_server)), replica(bus):
        await bus.publish(topology.EVAL_SCORED, scored("o", BASE, suite_version="binary-v1-old"))  # first champion
        await settled(bus)
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

        staged = await deploy("b" * 64)
        assert staged.ok and staged.state == "staged" and staged.checkpoint_uri == "file:///ckpt/b"
        assert "the champion has no score on suite binary-v1-aaaaaaaaaaaa to compare with" in staged.message
        assert "final once an inference replica serves it" in staged.message
        await settled(bus, staged.deployment_id)
        again = await deploy("file:///ckpt/b")
        assert again.ok and again.state == "already_champion"
        # The operator's call, even for a worse checkpoint; the reason says how it compares.
        worse = await deploy("file:///ckpt/a")
        assert worse.ok and worse.state == "staged" and "wrong where it is right on 2" in worse.message
        await settled(bus, worse.deployment_id)

        back = await rollback()
        assert back.ok and back.state == "staged" and back.checkpoint_sha256 == "b" * 64
        await settled(bus, back.deployment_id)
        back = await rollback()
        assert back.checkpoint_sha256 == "o" * 64
        await settled(bus, back.deployment_id)
        nothing = await rollback()
        assert not nothing.ok and nothing.state == "refused" and "no earlier champion" in nothing.message

    kept = await decisions(bus)
    assert [d.outcome for d in kept] == ["promoted", "kept", "kept", "refused", "refused", "promoted", "promoted",
                                         "rolled_back", "rolled_back"]
    assert kept[3].checkpoint_sha256 == "c" * 64 and kept[4].checkpoint_uri == "file:///ckpt/o"
    assert {d.requested_by for d in kept[3:]} == {"test"}
    assert [e.checkpoint_sha256[0] for e in await deployed_events(bus)] == ["o", "b", "a", "b", "o"]
