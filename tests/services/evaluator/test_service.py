"""The evaluator on a real bus: checkpoint.saved -> eval.scored (and hard examples), once per
(checkpoint, suite); the base model scored as the first candidate while there is no champion;
every champion, and no other checkpoint, on the sealed test suite (eval.tested), once per
(checkpoint, test version)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore, sha256_dir
from libs.common.bus import REASON_HEADER, Bus
from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    DatasetAccepted,
    DatasetSubmitted,
    EvalScored,
    LevelScore,
    encode_outcomes,
    new_id,
)
from libs.common.history import read_subject
from libs.common.http import ServiceMetrics, create_app
from libs.common.records import CHAMPION, Champion
from libs.common.settings import load_settings
from libs.common.skills import SKILLS
from services.deployer.promotion import crowned, decide
from services.evaluator.hard_examples import probe_items
from services.evaluator.scorebook import ScoreRecord
from services.evaluator.scoring import Scores
from services.evaluator.service import SERVICE
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import shared_problems
from services.gatekeeper.service import SERVICE as GATEKEEPER
from services.gatekeeper.settings import GatekeeperSettings
from tests.conftest import wait_for
from tests.services.conftest import running

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def evaluator_settings(nats_url: str, tmp_path: Path, **overrides) -> EvaluatorSettings:
    # Binary levels 1-2 and SYLLO level 1. The base model is scored only where a test asks for it.
    return load_settings(
        EvaluatorSettings, "evaluator", environ={}, data_dir=str(tmp_path / "data"), nats_url=nats_url,
        **{"suite_max_level": 2, "syllo_max_level": 1, "items_per_level": 2, "max_new_tokens": 8, "device": "cpu",
           "score_base_model": False, "hard_probe_items": 0, **overrides},
    )


async def stream_messages(bus: Bus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).state.messages


async def wait_until_drained(bus: Bus, delivered: int, timeout: float = 60.0) -> None:
    async def drained() -> bool:
        info = await bus.js.consumer_info(topology.EVALUATOR.stream, topology.EVALUATOR.durable)
        return info.delivered.consumer_seq >= delivered and info.num_pending == 0 and info.num_ack_pending == 0

    await wait_for(drained, f"the evaluator to finish {delivered} messages", timeout=timeout, interval=0.1)


async def test_checkpoint_is_scored_once_and_redelivery_republishes_the_same_event(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    submitted_sub = await bus.js.subscribe(topology.DATASET_SUBMITTED)
    settings = evaluator_settings(nats_server, tmp_path, hard_probe_items=3, hard_examples_min=2,
                                  hard_examples_min_accuracy=0.0)
    async with running(SERVICE, settings) as evaluator:
        # An intermediate checkpoint of the same run is acked unscored: only final ones are candidates.
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id(), final=False))
        await bus.publish(topology.CHECKPOINT_SAVED, checkpoint)
        msg = await scored_sub.next_msg(timeout=60)
        scored = msgspec.json.decode(msg.data, type=EvalScored)
        assert scored.checkpoint_sha256 == checkpoint.sha256 and scored.checkpoint_uri == checkpoint.uri
        assert scored.suite_version == evaluator.suite.version and scored.num_examples == 6
        assert 0.0 <= scored.exact_match <= 1.0 and scored.val_loss > 0
        # Both skills' levels are reported, as the curriculum and the deployer read them.
        assert set(scored.by_level) == set(scored.levels) == {"binary/1", "binary/2", "syllo/1"}
        assert scored.levels["syllo/1"].total == 2
        assert scored.exact_match_low <= scored.exact_match <= scored.exact_match_high
        assert len(scored.item_outcomes()) == 6 and scored.ece is not None
        assert scored.regressions == [] and scored.compared_with == ""  # no champion yet
        assert msg.headers["Nats-Msg-Id"] == scored.id

        # The training problems it failed went to the gatekeeper as a low-priority dataset.
        hard = msgspec.json.decode((await submitted_sub.next_msg(timeout=30)).data, type=DatasetSubmitted)
        assert (hard.priority, hard.channel, hard.submitted_by, hard.rows) == ("low", "hard-examples", "evaluator", None)
        store = ArtifactStore(tmp_path / "data" / "artifacts")
        rows = [msgspec.json.decode(line) for line in store.verify(hard.uri, hard.sha256).read_bytes().splitlines()]
        probes = {p.messages[0].content: p for p in probe_items(evaluator.suite, 3, checkpoint.sha256)}
        suite_prompts = {i.messages[0].content for i in evaluator.suite.items}
        # The untrained tiny model fails every probe it answers: all the Binary ones at least.
        prompts = {row["messages"][0]["content"] for row in rows}
        assert {p for p, probe in probes.items() if probe.skill == "binary"} <= prompts <= set(probes)
        assert len(rows) == len(prompts) and all(set(row) == {"messages"} for row in rows)
        for row in rows:
            user, assistant = row["messages"]
            probe = probes[user["content"]]
            assert SKILLS[probe.skill].split_of(user["content"]) == "train"
            assert user["content"] not in suite_prompts and assistant["content"] == probe.messages[-1].content

        # The same checkpoint announced again (a redelivery, or the trainer resending).
        record = next((tmp_path / "data" / "evaluator" / "scores").glob("*.json"))
        written = record.stat().st_mtime_ns
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id()))
        await wait_until_drained(bus, delivered=3)
        assert record.stat().st_mtime_ns == written  # not scored again
        # Republished with the same ids: dropped as duplicates, the hard examples submitted once.
        assert await stream_messages(bus, "EVALS") == 1
        assert await stream_messages(bus, "DATASETS") == 1

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
        assert detail[0]["event"]["exact_match"] == scored.exact_match and len(detail[0]["items"]) == 6
        assert detail[0]["hard_examples"]["id"] == hard.id
        assert (await client.get(f"/scores/{'1' * 64}")).status_code == 404
        assert (await client.get("/suite")).json()["version"] == evaluator.suite.version


async def test_a_checkpoint_is_scored_under_its_runs_profile_and_an_unknown_profile_is_refused(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    submitted_sub = await bus.js.subscribe(topology.DATASET_SUBMITTED)
    dead = await bus.js.subscribe(topology.dead_letter(topology.CHECKPOINT_SAVED))
    settings = evaluator_settings(nats_server, tmp_path, hard_probe_items=3, hard_examples_min=2,
                                  hard_examples_min_accuracy=0.0)
    async with running(SERVICE, settings) as evaluator:
        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, id=new_id(), profile="emoji"))
        reason = (await dead.next_msg(timeout=30)).headers[REASON_HEADER]
        assert "unknown profile 'emoji'; known: none, emoji_think, regime3" in reason

        await bus.publish(topology.CHECKPOINT_SAVED, msgspec.structs.replace(checkpoint, profile="regime3"))
        scored = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
        record = evaluator.scorebook.get(checkpoint.sha256, scored.suite_version)
        assert record.profile == "regime3" and evaluator.scorebook.profile_of(checkpoint.sha256) == "regime3"
        assert evaluator.scorebook.profile_of("1" * 64) == "none"  # never scored
        # Its failed practice problems train under the same profile.
        hard = msgspec.json.decode((await submitted_sub.next_msg(timeout=30)).data, type=DatasetSubmitted)
        assert hard.channel == "hard-examples" and hard.profile == "regime3"


async def test_the_champion_is_scored_on_this_suite_and_candidates_are_flagged_against_it(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tiny_model_dir: Path, tmp_path: Path,
):
    champion_record = await bus.record(CHAMPION)
    # The champion was scored on a suite this evaluator does not use.
    old = Champion(checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id=checkpoint.run_id,
                   step=checkpoint.step, exact_match=0.9, val_loss=0.1, suite_version="binary-v1-old",
                   deployed_at=checkpoint.time, event_id="e")
    await champion_record.put(old)
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    # With a champion the base model is not scored, even when asked to score it; 2 probes a level
    # (6 in all) are below the minimum of 7: no hard examples.
    settings = evaluator_settings(nats_server, tmp_path, champion_check_s=0.2, score_base_model=True,
                                  base_model=str(tiny_model_dir), hard_probe_items=2, hard_examples_min=7)
    async with running(SERVICE, settings) as evaluator:
        rescore = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
        assert rescore.checkpoint_sha256 == checkpoint.sha256 and rescore.suite_version == evaluator.suite.version
        assert rescore.run_id == checkpoint.run_id and len(rescore.item_outcomes()) == 6

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
        assert evaluator.scorebook.get(artifact.sha256, evaluator.suite.version).hard_examples is None
        assert candidate.confirmation is None  # not past the screen against a perfect champion

    assert await stream_messages(bus, "DATASETS") == 0
    # The champion's rescore and the candidate's score (the champion's sealed test goes to eval.tested).
    assert len(await read_subject(bus, topology.EVAL_SCORED)) == 2
    assert not (tmp_path / "data" / "artifacts" / "models").exists()  # the base model was never registered


async def test_with_no_champion_the_base_model_is_scored_once_even_across_a_restart(
    bus: Bus, nats_server: str, tiny_model_dir: Path, tmp_path: Path,
):
    # A core subscription sees every publish, also one JetStream drops as a duplicate.
    seen: list[EvalScored] = []

    async def on_scored(msg) -> None:
        seen.append(msgspec.json.decode(msg.data, type=EvalScored))

    await bus.nc.subscribe(topology.EVAL_SCORED, cb=on_scored)
    settings = evaluator_settings(nats_server, tmp_path, score_base_model=True, base_model=str(tiny_model_dir),
                                  champion_check_s=0.2, hard_probe_items=2, hard_examples_min=2)
    async with running(SERVICE, settings) as evaluator:
        await wait_for(lambda: seen, "the base model's score")
        [base] = seen
        assert (base.run_id, base.step, base.suite_version) == ("base", 0, evaluator.suite.version)
        # Registered in the artifact store: the deployer and inference can verify what it names.
        assert "/artifacts/models/base/" in base.checkpoint_uri
        assert base.checkpoint_sha256 == sha256_dir(tiny_model_dir)
        ArtifactStore(tmp_path / "data" / "artifacts").verify(base.checkpoint_uri, base.checkpoint_sha256)
        assert base.val_loss > 0 and len(base.item_outcomes()) == 6 and base.compared_with == ""
        # The deployer's rule promotes it as the first champion; a later candidate must beat it.
        first = decide(base, None)
        assert first.outcome == "promoted" and "first champion" in first.reason
        champion = crowned(base, None, reason=first.reason, event_id="e", now=base.time)
        same = msgspec.structs.replace(base, id=new_id(), run_id="run-1", checkpoint_sha256="c" * 64)
        assert decide(same, champion).outcome == "kept"
    record = next((tmp_path / "data" / "evaluator" / "scores").glob("*.json"))
    written = record.stat().st_mtime_ns
    assert await stream_messages(bus, "EVALS") == 1
    # Probed like any checkpoint, but it has learned no level: its failures are no hard examples.
    assert await stream_messages(bus, "DATASETS") == 0

    # Restarted, still no champion: the recorded score is republished (same id), not scored again.
    async with running(SERVICE, settings):
        await wait_for(lambda: len(seen) == 2, "the base model's score again")
    assert seen[1].id == base.id and seen[1] == base
    assert record.stat().st_mtime_ns == written
    assert await stream_messages(bus, "EVALS") == 1
    assert await stream_messages(bus, "DATASETS") == 0



async def test_the_gatekeeper_accepts_the_hard_examples_at_low_priority(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tiny_model_dir: Path, tmp_path: Path,
):
    accepted_sub = await bus.js.subscribe(topology.dataset_accepted("low"))
    common = {"environ": {}, "nats_url": nats_server, "data_dir": str(tmp_path / "data"),
              "base_model": str(tiny_model_dir)}
    async with (running(GATEKEEPER, load_settings(GatekeeperSettings, "gatekeeper", **common)),
                running(SERVICE, evaluator_settings(nats_server, tmp_path, hard_probe_items=3, hard_examples_min=2,
                                                    hard_examples_min_accuracy=0.0))):
        await bus.publish(topology.CHECKPOINT_SAVED, checkpoint)
        accepted = msgspec.json.decode((await accepted_sub.next_msg(timeout=60)).data, type=DatasetAccepted)
    # The untrained model fails every probe it answers, at least the 6 Binary ones.
    assert accepted.priority == "low" and accepted.num_rows >= 6 and accepted.name.startswith("hard-examples-")


# ---------------------------------------------------------------------------- the sealed test


def copy_checkpoint(store: ArtifactStore, checkpoint: CheckpointSaved, run_id: str) -> CheckpointSaved:
    """Another final checkpoint of the same weights (one more file: another sha256)."""
    target = store.location("checkpoints", run_id, "step-4")
    shutil.copytree(store.verify(checkpoint.uri, checkpoint.sha256), target)
    (target / "NOTES.txt").write_text(run_id)
    artifact = store.describe_dir(target)
    return msgspec.structs.replace(checkpoint, id=new_id(), run_id=run_id, uri=artifact.uri, sha256=artifact.sha256)


def champion_of(scored: EvalScored) -> Champion:
    """The champion record the deployer writes for a promoted candidate (its fields that exist for good)."""
    return Champion(
        checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256, run_id=scored.run_id,
        step=scored.step, exact_match=scored.exact_match, val_loss=scored.val_loss,
        suite_version=scored.suite_version, deployed_at=scored.time, event_id=new_id(), eval_id=scored.id,
        num_examples=scored.num_examples, outcomes=scored.outcomes, levels=scored.levels,
    )


async def test_every_champion_is_scored_on_the_sealed_test_once_per_test_version_and_no_other_checkpoint(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    # A core subscription sees every publish, also one JetStream drops as a duplicate.
    tested: list[tuple[str, ChampionTested]] = []

    async def on_tested(msg) -> None:
        tested.append((msg.headers["Nats-Msg-Id"], msgspec.json.decode(msg.data, type=ChampionTested)))

    await bus.nc.subscribe(topology.EVAL_TESTED, cb=on_tested)
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    champion_record = await bus.record(CHAMPION)
    store = ArtifactStore(tmp_path / "data" / "artifacts")
    first, second, never = checkpoint, copy_checkpoint(store, checkpoint, "run-2"), copy_checkpoint(store, checkpoint, "run-3")
    settings = evaluator_settings(nats_server, tmp_path, champion_check_s=0.1)

    def tests_of(sha256: str) -> list[ChampionTested]:
        return [event for _, event in tested if event.checkpoint_sha256 == sha256]

    async with running(SERVICE, settings) as evaluator:
        test_suite = evaluator.test_suite
        assert test_suite.name == "skills-test" and test_suite.version != evaluator.suite.version
        assert test_suite.levels() == evaluator.suite.levels() and len(test_suite.items) == 6
        assert not shared_problems(test_suite, evaluator.suite)
        # Three candidates scored on the selection suite; none is champion, none is tested.
        for saved in (first, second, never):
            await bus.publish(topology.CHECKPOINT_SAVED, saved)
        scores = {}
        for _ in range(3):
            score = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
            scores[score.checkpoint_sha256] = score

        # The first becomes champion: it is scored on the sealed test and announced.
        await champion_record.put(champion_of(scores[first.sha256]))
        await wait_for(lambda: tests_of(first.sha256), "the first champion's sealed test")
        [(msg_id, event)] = tested
        assert msg_id == event.id and event.source == "evaluator"
        assert (event.run_id, event.step, event.checkpoint_uri) == ("run-1", 4, first.uri)
        assert (event.suite, event.suite_version) == ("skills-test", test_suite.version)
        assert event.eval_id == scores[first.sha256].id and event.selection_suite_version == evaluator.suite.version
        assert event.num_examples == 6 and len(event.item_outcomes()) == 6 and event.val_loss > 0
        assert event.exact_match_low <= event.exact_match <= event.exact_match_high
        assert set(event.levels) == {"binary/1", "binary/2", "syllo/1"}
        assert all(s.total == 2 and s.low <= s.accuracy <= s.high for s in event.levels.values())
        record = evaluator.testbook.get(first.sha256, test_suite.version)
        # Recorded as published (the bus names the source as it sends).
        assert msgspec.structs.replace(record.event, source="evaluator") == event and len(record.items) == 6
        await wait_for(lambda: evaluator.testbook.get(first.sha256, test_suite.version).published, "marked published")

        # A new champion gets its own; the first is not announced again meanwhile.
        await champion_record.put(champion_of(scores[second.sha256]))
        await wait_for(lambda: tests_of(second.sha256), "the second champion's sealed test")
        await wait_for(lambda: evaluator.testbook.get(second.sha256, test_suite.version).published, "marked published")
        assert [e.checkpoint_sha256 for _, e in tested] == [first.sha256, second.sha256]
    announced = evaluator.testbook.get(second.sha256, test_suite.version)
    assert await stream_messages(bus, "EVALS") == 3 + 2  # the three selection scores, the two tests

    # A crash between recording and publishing: the next start publishes the recorded event (same
    # id, not scored again), and only that.
    evaluator.testbook.save(msgspec.structs.replace(announced, published=False))
    async with running(SERVICE, settings) as evaluator:
        await wait_for(lambda: len(tested) == 3, "the recorded test published again")
        assert tested[2] == (announced.event.id, msgspec.structs.replace(announced.event, source="evaluator"))
        await wait_for(lambda: evaluator.testbook.get(second.sha256, test_suite.version).published, "marked published")
    assert await stream_messages(bus, "EVALS") == 5  # a duplicate id: JetStream dropped it

    # A new test seed rolls out a new test version: the champion is tested on it first, then the one it
    # replaced (so the promotion between them compares on the same items); the old scores stay.
    async with running(SERVICE, evaluator_settings(nats_server, tmp_path, champion_check_s=0.1,
                                                   test_seed=settings.test_seed + 1)) as evaluator:
        assert evaluator.test_suite.version != test_suite.version
        await wait_for(lambda: len(tested) == 5, "the champions' tests on the new version")
        renewed = tested[3][1]
        assert renewed.checkpoint_sha256 == second.sha256 and renewed.suite_version == evaluator.test_suite.version
        assert (tested[4][1].checkpoint_sha256, tested[4][1].suite_version) == (first.sha256, renewed.suite_version)
        assert renewed.id != announced.event.id
        assert evaluator.testbook.get(second.sha256, test_suite.version).event == announced.event
        assert [r.event.suite_version for r in evaluator.testbook.for_checkpoint(second.sha256)] == sorted(
            [test_suite.version, renewed.suite_version])
    assert await stream_messages(bus, "EVALS") == 7
    # Only champions were ever tested.
    assert not tests_of(never.sha256) and not evaluator.testbook.for_checkpoint(never.sha256)


async def test_a_candidate_past_the_screen_is_confirmed_with_the_champion_on_the_confirmation_suite(
    bus: Bus, nats_server: str, checkpoint: CheckpointSaved, tmp_path: Path,
):
    champion_record = await bus.record(CHAMPION)
    await champion_record.put(Champion(
        checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id=checkpoint.run_id,
        step=checkpoint.step, exact_match=0.0, val_loss=1.0, suite_version="binary-v1-old",
        deployed_at=checkpoint.time, event_id="e"))
    scored_sub = await bus.js.subscribe(topology.EVAL_SCORED)
    # 3 selection items a level (9): all right against none is p = 1/512, past the screen.
    settings = evaluator_settings(nats_server, tmp_path, champion_check_s=0.2, items_per_level=3,
                                  confirm_items_per_level=3)
    async with running(SERVICE, settings) as evaluator:
        # The champion on this suite (the untrained tiny model: nothing right).
        champion = msgspec.json.decode((await scored_sub.next_msg(timeout=60)).data, type=EvalScored)
        assert champion.checkpoint_sha256 == checkpoint.sha256
        q = evaluator.confirmation_suite
        assert {item.level_key for item in q.items} == set(champion.levels) and len(q.items) == 9
        assert not shared_problems(q, evaluator.suite) and not shared_problems(q, evaluator.test_suite)

        # A candidate whose selection score passes the screen against it everywhere it can be ahead.
        store = ArtifactStore(tmp_path / "data" / "artifacts")
        target = store.location("checkpoints", "run-2", "step-1")
        shutil.copytree(store.verify(checkpoint.uri, checkpoint.sha256), target)
        (target / "NOTES.txt").write_text("another checkpoint")
        candidate = store.describe_dir(target)
        everything = [True] * champion.num_examples
        screen = Scores(
            val_loss=0.5, exact_match=1.0, exact_match_low=0.5, exact_match_high=1.0, ece=None,
            by_level={k: 1.0 for k in champion.levels}, num_examples=champion.num_examples, items=[],
            levels={k: msgspec.structs.replace(v, correct=v.total, accuracy=1.0) for k, v in champion.levels.items()},
            outcomes=encode_outcomes(everything),
        )
        ahead = [k for k, v in champion.levels.items() if v.correct < v.total]
        # Called as `score` calls it: holding the evaluator's one model slot (its champion loop tests too).
        async with evaluator._scoring:
            confirmation = await evaluator._confirm(target, candidate.sha256, "none", screen, champion)
        assert confirmation is not None and confirmation.levels == ahead
        assert confirmation.champion_sha256 == checkpoint.sha256 and confirmation.suite_version == q.version
        mine, theirs = confirmation.item_outcomes()
        assert len(mine) == len(theirs) == 3 * len(ahead) == confirmation.num_examples
        # Both were scored on those levels once, and kept: the champion's record serves the next candidate.
        kept = evaluator.confirmbook.get(checkpoint.sha256, q.version)
        assert set(kept.items) == set(ahead) and all(len(kept.items[k]) == 3 for k in ahead)
        assert set(evaluator.confirmbook.get(candidate.sha256, q.version).items) == set(ahead)
        async with evaluator._scoring:
            again = await evaluator._confirm(target, candidate.sha256, "none", screen, champion)
        assert again == confirmation and evaluator.confirmbook.get(checkpoint.sha256, q.version) == kept

        # Not past the screen (the same answers as the champion): nothing is confirmed, nothing scored.
        same = msgspec.structs.replace(screen, levels=champion.levels, outcomes=champion.outcomes)
        async with evaluator._scoring:
            assert await evaluator._confirm(target, "c" * 64, "none", same, champion) is None
        assert evaluator.confirmbook.get("c" * 64, q.version) is None
