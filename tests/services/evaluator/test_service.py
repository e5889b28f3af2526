"""The evaluator on a real bus: checkpoint.saved -> eval.scored, once per (checkpoint, suite)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import REASON_HEADER, Bus
from libs.common.events import CheckpointSaved, EvalScored, LevelScore, new_id
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CHAMPION, Champion
from libs.common.settings import load_settings
from services.evaluator.scorebook import ScoreRecord
from services.evaluator.service import SERVICE
from services.evaluator.settings import EvaluatorSettings
from tests.conftest import wait_for
from tests.services.conftest import running

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def evaluator_settings(nats_url: str, tmp_path: Path, **overrides) -> EvaluatorSettings:
    return load_settings(
        EvaluatorSettings, "evaluator", environ={}, data_dir=str(tmp_path / "data"), nats_url=nats_url,
        suite_max_level=2, items_per_level=2, max_new_tokens=8, device="cpu", **overrides,
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
        # An intermediate checkpoint of the same run is acked unscored: only final ones are candidates.
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id(), final=False))
        await bus.publish(topology.CHECKPOINT_SAVED, checkpoint)
        msg = await scored_sub.next_msg(timeout=60)
        scored = msgspec.json.decode(msg.data, type=EvalScored)
        assert scored.checkpoint_sha256 == checkpoint.sha256 and scored.checkpoint_uri == checkpoint.uri
        assert scored.suite_version == evaluator.suite.version and scored.num_examples == 4
        assert 0.0 <= scored.exact_match <= 1.0 and scored.val_loss > 0
        assert set(scored.by_level) == set(scored.levels) == {"binary/1", "binary/2"}
        assert scored.exact_match_low <= scored.exact_match <= scored.exact_match_high
        assert len(scored.item_outcomes()) == 4 and scored.ece is not None
        assert scored.regressions == [] and scored.compared_with == ""  # no champion yet
        assert msg.headers["Nats-Msg-Id"] == scored.id

        # The same checkpoint announced again (a redelivery, or the trainer resending).
        record = next((tmp_path / "data" / "evaluator" / "scores").glob("*.json"))
        written = record.stat().st_mtime_ns
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id()))
        await wait_until_drained(bus, delivered=3)
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


async def test_the_champion_is_scored_on_this_suite_and_candidates_are_flagged_against_it(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    champion_record = await bus.record(CHAMPION)
    # The champion was scored on a suite this evaluator does not use.
    old = Champion(checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id=checkpoint.run_id,
                   step=checkpoint.step, exact_match=0.9, val_loss=0.1, suite_version="binary-v1-old",
                   deployed_at=checkpoint.time, event_id="e")
    await champion_record.put(old)
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    async with running(SERVICE, evaluator_settings(nats_server, tmp_path, champion_check_s=0.2)) as evaluator:
        rescore = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
        assert rescore.checkpoint_sha256 == checkpoint.sha256 and rescore.suite_version == evaluator.suite.version
        assert rescore.run_id == checkpoint.run_id and len(rescore.item_outcomes()) == 4

        # Now the champion is a checkpoint that was perfect on this suite, at half the loss.
        perfect = msgspec.structs.replace(
            rescore, id=new_id(), checkpoint_sha256="f" * 64, val_loss=rescore.val_loss / 2,
            levels={k: LevelScore(correct=v.total, total=v.total, accuracy=1.0, low=0.5, high=1.0)
                    for k, v in rescore.levels.items()},
        )
        evaluator.scorebook.save(ScoreRecord(event=perfect, items=[]))
        await champion_record.put(msgspec.structs.replace(
            old, checkpoint_sha256="f" * 64, suite_version=evaluator.suite.version, outcomes=perfect.outcomes,
            num_examples=4))

        # A different checkpoint of the same weights (one more file: another sha256).
        store = ArtifactStore(tmp_path / "data" / "artifacts")
        source = store.verify(checkpoint.uri, checkpoint.sha256)
        target = store.location("checkpoints", "run-2", "step-1")
        shutil.copytree(source, target)
        (target / "NOTES.txt").write_text("another checkpoint")
        artifact = store.describe_dir(target)
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(
            checkpoint, id=new_id(), run_id="run-2", uri=artifact.uri, sha256=artifact.sha256))
        candidate = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
        assert candidate.checkpoint_sha256 == artifact.sha256 and candidate.compared_with == "f" * 64
        assert "val loss" in candidate.regressions[-1] and "up 100.0%" in candidate.regressions[-1]
        if candidate.exact_match < 1.0:
            assert any("accuracy" in r and "points" in r for r in candidate.regressions)
