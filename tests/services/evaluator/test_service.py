"""The evaluator on a real bus: checkpoint.saved -> eval.scored, once per (checkpoint, suite)."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest

from libs.common import topology
from libs.common.bus import REASON_HEADER, Bus
from libs.common.events import CheckpointSaved, EvalScored, new_id
from libs.common.http import ServiceMetrics, create_app
from libs.common.settings import load_settings
from services.evaluator.service import SERVICE
from services.evaluator.settings import EvaluatorSettings
from tests.conftest import wait_for
from tests.services.conftest import running

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def evaluator_settings(nats_url: str, tmp_path: Path) -> EvaluatorSettings:
    return load_settings(
        EvaluatorSettings, "evaluator", environ={}, data_dir=str(tmp_path / "data"), nats_url=nats_url,
        suite_max_level=2, items_per_level=2, max_new_tokens=8, device="cpu",
    )


async def wait_until_drained(bus: Bus, delivered: int, timeout: float = 60.0) -> None:
    async def drained() -> bool:
        info = await bus.js.consumer_info(topology.EVALUATOR.stream, topology.EVALUATOR.durable)
        return info.delivered.consumer_seq >= delivered and info.num_pending == 0 and info.num_ack_pending == 0

    await wait_for(drained, f"the evaluator to finish {delivered} messages", timeout=timeout, interval=0.1)


async def test_checkpoint_is_scored_once_and_redelivery_republishes_the_same_event(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    async with running(SERVICE, evaluator_settings(nats_server, tmp_path)) as evaluator:
        await bus.publish(topology.CHECKPOINT_SAVED, checkpoint)
        msg = await scored_sub.next_msg(timeout=60)
        scored = msgspec.json.decode(msg.data, type=EvalScored)
        assert scored.checkpoint_sha256 == checkpoint.sha256 and scored.checkpoint_uri == checkpoint.uri
        assert scored.suite_version == evaluator.suite.version and scored.num_examples == 4
        assert 0.0 <= scored.exact_match <= 1.0 and scored.val_loss > 0
        assert set(scored.by_level) == {"binary/1", "binary/2"}
        assert msg.headers["Nats-Msg-Id"] == scored.id

        # The same checkpoint announced again (a redelivery, or the trainer resending).
        record = next((tmp_path / "data" / "evaluator" / "scores").glob("*.json"))
        written = record.stat().st_mtime_ns
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id()))
        await wait_until_drained(bus, delivered=2)
        assert record.stat().st_mtime_ns == written  # not scored again
        evals = await bus.js.stream_info("EVALS")
        assert evals.state.messages == 1  # republished with the same id: dropped as a duplicate

        # A checkpoint whose content does not match its hash is refused, with the reason.
        dead = await bus.js.subscribe(topology.dead_letter(topology.CHECKPOINT_SAVED))
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id(), sha256="0" * 64))
        reason = (await dead.next_msg(timeout=30)).headers[REASON_HEADER]
        assert "does not match" in reason

    app = create_app("evaluator", ServiceMetrics("evaluator"), {})
    app.include_router(SERVICE.routes(evaluator))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        recent = (await client.get("/scores")).json()
        assert [s["id"] for s in recent] == [scored.id]
        detail = (await client.get(f"/scores/{checkpoint.sha256}")).json()
        assert detail[0]["event"]["exact_match"] == scored.exact_match and len(detail[0]["items"]) == 4
        assert (await client.get(f"/scores/{'1' * 64}")).status_code == 404
        assert (await client.get("/suite")).json()["version"] == evaluator.suite.version
