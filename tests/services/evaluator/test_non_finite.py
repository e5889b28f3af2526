"""A diverged checkpoint's score (NaN val loss) crosses the bus as null and breaks no consumer:
the deployer (its one consumer) refuses it with a reason, nothing is dead-lettered."""

from __future__ import annotations

import math

import msgspec
import pytest

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import EvalScored, LevelScore, encode_outcomes
from libs.common.records import DEPLOY_DECISIONS
from libs.common.settings import load_settings
from services.deployer.service import SERVICE as DEPLOYER
from services.deployer.settings import DeployerSettings
from tests.conftest import wait_for
from tests.services.conftest import running

pytestmark = pytest.mark.integration


def diverged() -> EvalScored:
    return EvalScored(
        run_id="r", step=3, checkpoint_uri="file:///ckpt/n", checkpoint_sha256="n" * 64, suite="binary",
        suite_version="binary-v1-x", exact_match=0.5, val_loss=math.nan, num_examples=2, ece=math.nan,
        by_level={"binary/1": 0.5}, exact_match_low=0.09, exact_match_high=0.91,
        levels={"binary/1": LevelScore(correct=1, total=2, accuracy=0.5, low=0.09, high=0.91, val_loss=math.inf)},
        outcomes=encode_outcomes([True, False]),
    )


async def settled(bus: Bus, spec: topology.ConsumerSpec) -> bool:
    info = await bus.js.consumer_info(spec.stream, spec.durable)
    return info.ack_floor.consumer_seq >= 1 and info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_nan_val_loss_round_trips_and_no_consumer_dead_letters_it(bus: Bus, nats_server: str, tmp_path):
    event = diverged()
    decoded = msgspec.json.decode(msgspec.json.encode(event), type=EvalScored)
    assert decoded.val_loss is None and decoded.ece is None and decoded.levels["binary/1"].val_loss is None

    common = {"environ": {}, "nats_url": nats_server, "data_dir": str(tmp_path / "data")}
    assert [spec.durable for spec in topology.CONSUMERS if spec.filter_subject == topology.EVAL_SCORED] == [
        topology.DEPLOYER.durable]
    async with running(DEPLOYER, load_settings(DeployerSettings, "deployer", **common)):
        await bus.publish(topology.EVAL_SCORED, event)
        await wait_for(lambda: settled(bus, topology.DEPLOYER), "the deployer to settle the score")

    assert (await bus.js.stream_info("DEADLETTER")).state.messages == 0
    decisions, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
    [refused] = decisions.decisions
    assert refused.outcome == "refused" and "val loss is not finite" in refused.reason
