"""`build_lineage` on hand-built histories: the chain back to the base, resumes, datasets trained
twice, rollbacks, sha prefixes, unknown models and a history whose oldest part aged out.

`LoopHistory` writes the events a small loop publishes, in order and with their trace ids; the
integration test (tests/flywheel/test_lineage.py) publishes the same on a real bus.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from libs.common import topology
from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    DatasetAccepted,
    DatasetSubmitted,
    EvalScored,
    Event,
    LevelScore,
    ModelDeployed,
    ModelRolledBack,
    TrainingFailed,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
    encode_outcomes,
)
from libs.common.history import Recorded
from libs.common.lineage import UnknownModel, build_lineage, parse_checkpoint_uri
from libs.common.records import Champion, DeployDecision

STORE = "file:///data/artifacts"
BASE_URI = "file:///data/models/tiny-qwen3"
BASE_ARTIFACT = f"{STORE}/models/base"
SUITE = "binary"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def sha(*key: object) -> str:
    return hashlib.sha256(":".join(map(str, key)).encode()).hexdigest()


def checkpoint_uri(run_id: str, global_step: int) -> str:
    return f"{STORE}/checkpoints/{run_id}/step-{global_step:08d}"


def trace(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


@dataclass
class LoopHistory:
    """What the services publish, in order: (subject, event, trace id)."""

    published: list[tuple[str, Event, str]] = field(default_factory=list)
    decisions: list[DeployDecision] = field(default_factory=list)
    champion: Champion | None = None
    global_step: int = 0
    clock: datetime = T0
    scores: dict[str, EvalScored] = field(default_factory=dict)

    def _tick(self) -> datetime:
        self.clock += timedelta(seconds=7)
        return self.clock

    def emit(self, subject: str, event: Event, trace_id: str) -> Event:
        event = msgspec.structs.replace(event, time=self._tick())
        self.published.append((subject, event, trace_id))
        return event

    def dataset(self, name: str, *, rows: int = 4, channel: str = "curriculum", inline: bool = True,
                priority: str = "low", dropped: int = 0, content: str | None = None) -> DatasetAccepted:
        tid = trace(f"dataset {name} {len(self.published)}")
        submitted = DatasetSubmitted(
            id=sha("submission", name, len(self.published))[:32], name=name, priority=priority,
            rows=[{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                  for i in range(rows)] if inline else None,
            uri=None if inline else f"{STORE}/uploads/{name}.jsonl", sha256=None if inline else sha(name),
            submitted_by=channel if channel != "cli" else "alice", channel=channel, source=channel)
        # An inbox file or an HTTP upload reaches the gatekeeper without a dataset.submitted event.
        if channel not in ("inbox", "http"):
            self.emit(topology.DATASET_SUBMITTED, submitted, tid)
        dataset_id = sha("dataset", content or name)
        return self.emit(topology.dataset_accepted(priority), DatasetAccepted(
            dataset_id=dataset_id, name=name, uri=f"{STORE}/datasets/{dataset_id}.jsonl", sha256=dataset_id,
            schema="chat_sft_v1", priority=priority, num_rows=rows - dropped, num_rows_dropped=dropped,
            report_uri=f"{STORE}/reports/{dataset_id}.json", submission_id=submitted.id, source="gatekeeper",
            channel=channel, submitted_by=submitted.submitted_by),
            tid)

    def run(self, dataset: DatasetAccepted, init_weights: str, *, steps: int = 8, save_every: int = 4,
            fail_at: int | None = None, progress: bool = True) -> CheckpointSaved:
        """A run to the end; with `fail_at`, it fails there once and resumes from its last checkpoint."""
        run_id = f"ds-{dataset.dataset_id[:12]}-{sha(init_weights)[:8]}"
        tid = trace(f"run {run_id}")
        start_global, start, last = self.global_step, 0, None
        while True:
            self.emit(topology.TRAINING_STARTED, TrainingStarted(
                run_id=run_id, dataset_id=dataset.dataset_id, init_weights=init_weights, total_steps=steps,
                start_step=start, global_step=start_global + start, source="trainer"), tid)
            for step in range(start + 1, steps + 1):
                if progress:
                    self.emit(topology.TRAINING_PROGRESS, TrainingProgress(
                        run_id=run_id, dataset_id=dataset.dataset_id, step=step, total_steps=steps,
                        global_step=start_global + step, loss=1.0 / step, learning_rate=1e-4,
                        tokens_per_second=900.0), tid)
                if fail_at is not None and step == fail_at:
                    self.emit(topology.TRAINING_FAILED, TrainingFailed(
                        run_id=run_id, dataset_id=dataset.dataset_id, error="RuntimeError('worker lost')",
                        will_retry=True), tid)
                    fail_at, start = None, last.step if last else 0
                    break
                if step % save_every == 0 or step == steps:
                    uri = checkpoint_uri(run_id, start_global + step)
                    last = self.emit(topology.CHECKPOINT_SAVED, CheckpointSaved(
                        id=sha("checkpoint", run_id, step)[:32], run_id=run_id, step=step,
                        global_step=start_global + step, dataset_id=dataset.dataset_id, uri=uri,
                        sha256=sha("weights", uri), final=step == steps), tid)
            else:
                break
        self.global_step = start_global + steps
        self.emit(topology.TRAINING_FINISHED, TrainingFinished(
            run_id=run_id, dataset_id=dataset.dataset_id, global_step=self.global_step, final_loss=1.0 / steps,
            checkpoint_uri=last.uri, duration_s=42.5), tid)
        return last

    def score(self, uri: str, sha256: str, run_id: str, step: int, exact_match: float, *, tid: str,
              suite_version: str = "v1", regressions: tuple[str, ...] = ()) -> EvalScored:
        n = 16
        correct = round(exact_match * n)
        levels = {"binary/1": LevelScore(correct=correct, total=n, accuracy=correct / n, low=max(0.0, correct / n - 0.2),
                                         high=min(1.0, correct / n + 0.2), val_loss=0.5)}
        champion = self.champion.checkpoint_sha256 if self.champion else ""
        scored = self.emit(topology.EVAL_SCORED, EvalScored(
            id=sha("eval", sha256, suite_version)[:32], run_id=run_id, step=step, checkpoint_uri=uri,
            checkpoint_sha256=sha256, suite=SUITE, suite_version=suite_version, exact_match=correct / n,
            val_loss=0.5 + (1 - exact_match), num_examples=n, by_level={"binary/1": correct / n},
            exact_match_low=max(0.0, correct / n - 0.2), exact_match_high=min(1.0, correct / n + 0.2),
            levels=levels, outcomes=encode_outcomes([i < correct for i in range(n)]),
            regressions=list(regressions), compared_with=champion if regressions else "", source="evaluator"), tid)
        self.scores[sha256] = scored
        return scored

    def tested(self, scored: EvalScored, exact_match: float, *, suite_version: str = "t1") -> ChampionTested:
        """The champion scored as `scored` on the sealed test suite, by the evaluator."""
        n = 16
        correct = round(exact_match * n)
        low, high = max(0.0, correct / n - 0.25), min(1.0, correct / n + 0.2)
        return self.emit(topology.EVAL_TESTED, ChampionTested(
            id=sha("tested", scored.checkpoint_sha256, suite_version)[:32], run_id=scored.run_id, step=scored.step,
            checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256, suite="skills-test",
            suite_version=suite_version, exact_match=correct / n, exact_match_low=low, exact_match_high=high,
            num_examples=n, val_loss=0.6, levels={"binary/1": LevelScore(correct=correct, total=n, accuracy=correct / n,
                                                                          low=low, high=high)},
            outcomes=encode_outcomes([i < correct for i in range(n)]), eval_id=scored.id,
            selection_suite_version=scored.suite_version, source="evaluator"), trace(f"test {scored.checkpoint_sha256}"))

    def score_checkpoint(self, saved: CheckpointSaved, exact_match: float, **kw) -> EvalScored:
        return self.score(saved.uri, saved.sha256, saved.run_id, saved.step, exact_match,
                          tid=trace(f"run {saved.run_id}"), **kw)

    def decide(self, scored: EvalScored, outcome: str, reason: str, *, requested_by: str = "eval.scored") -> None:
        self.decisions.append(DeployDecision(
            id=sha("decision", scored.id, len(self.decisions))[:32], time=self._tick(), outcome=outcome,
            reason=reason, checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256,
            run_id=scored.run_id, suite_version=scored.suite_version,
            champion_sha256=self.champion.checkpoint_sha256 if self.champion else "", requested_by=requested_by))

    def deploy(self, scored: EvalScored, reason: str, *, rollback_from: str = "") -> ModelDeployed:
        previous = self.champion.checkpoint_uri if self.champion else ""
        event_id = sha("deploy", scored.checkpoint_sha256, len(self.published))[:32]
        tid = trace(f"deploy {event_id}")
        if rollback_from:
            self.emit(topology.MODEL_ROLLED_BACK, ModelRolledBack(
                checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256,
                rolled_back_from=rollback_from, reason=reason, source="deployer"), tid)
        deployed = self.emit(topology.MODEL_DEPLOYED, ModelDeployed(
            id=event_id, checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256,
            run_id=scored.run_id, step=scored.step, exact_match=scored.exact_match, val_loss=scored.val_loss or 0.0,
            reason=reason, previous_checkpoint_uri=previous, source="deployer"), tid)
        self.decide(scored, "rolled_back" if rollback_from else "promoted", f"{reason}; served by replica-1")
        self.champion = Champion(
            checkpoint_uri=scored.checkpoint_uri, checkpoint_sha256=scored.checkpoint_sha256, run_id=scored.run_id,
            step=scored.step, exact_match=scored.exact_match, val_loss=scored.val_loss or 0.0,
            suite_version=scored.suite_version, deployed_at=deployed.time, event_id=deployed.id, reason=reason,
            previous_checkpoint_uri=previous, kind="rollback" if rollback_from else "promotion")
        return deployed

    def records(self) -> list[Recorded]:
        """What the streams store: stream, per-stream sequence, stored time and trace id of each."""
        seqs: dict[str, int] = {}
        found = []
        for subject, event, trace_id in self.published:
            stream = topology.stream_for(subject)
            seqs[stream] = seqs.get(stream, 0) + 1
            found.append(Recorded(stream=stream, seq=seqs[stream], subject=subject,
                                  stored=event.time + timedelta(milliseconds=3), trace_id=trace_id, event=event))
        return found


@dataclass
class Loop:
    history: LoopHistory
    base: EvalScored
    c1: CheckpointSaved
    c2: CheckpointSaved
    c3: CheckpointSaved
    mid2: CheckpointSaved


def three_runs(start: datetime = T0) -> Loop:
    """The base scored, served and tested; run 1 promoted over it (replaced before it was tested);
    run 2 (failed once, resumed) kept out by the noise; run 3 promoted over run 1, tested, and
    scored on a second suite version."""
    h = LoopHistory(clock=start)
    base_sha = sha("base weights")
    base = h.score(f"{BASE_ARTIFACT}/{base_sha}", base_sha, "base", 0, 0.25, tid=trace("base"))
    h.deploy(base, "first champion (exact_match 0.250)")
    h.tested(base, 0.1875)
    d1 = h.dataset("curriculum-binary-L1-1", rows=6, dropped=1)
    c1 = h.run(d1, BASE_URI)
    s1 = h.score_checkpoint(c1, 0.5)
    h.deploy(s1, "better beyond the noise: p = 0.0100 <= alpha 0.05 (exact_match 0.500 vs 0.250)")
    d2 = h.dataset("alice-questions", channel="cli", inline=False, priority="high", rows=10)
    c2 = h.run(d2, c1.uri, fail_at=6)
    mid2 = next(e for _, e, _ in h.published if isinstance(e, CheckpointSaved) and e.run_id == c2.run_id
                and not e.final)
    s2 = h.score_checkpoint(c2, 0.5625, regressions=("binary/1 accuracy 0.500 vs 0.560: down 6.0 points",))
    h.decide(s2, "kept", "not better beyond the noise: p = 0.4000 > alpha 0.05")
    d3 = h.dataset("curriculum-binary-L2-2", rows=8)
    c3 = h.run(d3, c2.uri)
    s3 = h.score_checkpoint(c3, 0.75)
    h.deploy(s3, "better beyond the noise: p = 0.0010 <= alpha 0.05 (exact_match 0.750 vs 0.500)")
    h.tested(s3, 0.625)
    h.score(c3.uri, c3.sha256, c3.run_id, c3.step, 0.8125, tid=trace("rescore"), suite_version="v2")
    return Loop(h, base, c1, c2, c3, mid2)


# ---------------------------------------------------------------------------- the served model


def test_the_served_model_goes_back_through_every_run_to_the_base():
    loop = three_runs()
    h = loop.history
    lineage = build_lineage(h.records(), champion=h.champion, decisions=h.decisions)

    assert lineage.served and lineage.deployed and lineage.query == ""
    assert lineage.model.sha256 == loop.c3.sha256 == lineage.champion.sha256
    assert [hop.checkpoint.run_id for hop in lineage.hops] == [loop.c3.run_id, loop.c2.run_id, loop.c1.run_id]
    assert [hop.parent for hop in lineage.hops] == [loop.c2.uri, loop.c1.uri, BASE_URI]
    assert lineage.origin.kind == "base" and lineage.origin.uri == BASE_URI
    assert "is served" in lineage.summary and "3 hops back to the base model" in lineage.summary

    top = lineage.hops[0]
    assert top.checkpoint.uri == loop.c3.uri and top.checkpoint.final and top.checkpoint.global_step == 24
    assert top.run.final_loss == 1 / 8 and top.run.duration_s == 42.5 and top.run.init_weights == loop.c2.uri
    assert top.dataset.name == "curriculum-binary-L2-2" and top.dataset.num_rows == 8
    assert top.dataset.submission.channel == "curriculum" and top.dataset.submission.inline
    # Scored on two suite versions, in the order they were scored.
    assert [(s.suite, s.suite_version, s.exact_match) for s in top.scores] == [("binary", "v1", 0.75),
                                                                                ("binary", "v2", 0.8125)]
    assert top.scores[0].levels["binary/1"].accuracy == 0.75 and top.scores[0].exact_match_low == 0.55
    # As champion, tested on the sealed test suite: its own figures, lower than the selection's.
    [sealed] = top.tests
    assert (sealed.suite, sealed.suite_version, sealed.exact_match) == ("skills-test", "t1", 0.625)
    assert sealed.levels["binary/1"].low == 0.375 and sealed.eval_id == sha("eval", loop.c3.sha256, "v1")[:32]
    assert sealed.trace_id == trace(f"test {loop.c3.sha256}") and sealed.trace_id in lineage.trace_ids
    # Why it was promoted over the champion before it (run 1, not run 2: run 2 was never served).
    [deployment] = top.deployments
    assert deployment.kind == "promotion" and deployment.previous.sha256 == loop.c1.sha256
    assert deployment.previous.run_id == loop.c1.run_id and "0.750 vs 0.500" in deployment.reason
    assert deployment.decision.outcome == "promoted" and deployment.replaced_by is None
    assert not deployment.rolled_back

    # Run 2: failed once, resumed from its checkpoint at step 4, never deployed, kept out with a reason.
    middle = lineage.hops[1]
    assert [a.start_step for a in middle.run.attempts] == [0, 4] and middle.run.resumes == 1
    assert [f.error for f in middle.run.failures] == ["RuntimeError('worker lost')"]
    assert middle.run.checkpoints_saved == 2 and middle.deployments == []
    assert [d.outcome for d in middle.decisions] == ["kept"]
    assert middle.scores[0].regressions and middle.scores[0].compared_with == loop.c1.sha256
    assert middle.tests == []  # never champion: never tested
    assert middle.dataset.submission.channel == "cli" and middle.dataset.submission.submitted_by == "alice"
    assert not middle.dataset.submission.inline and middle.dataset.priority == "high"

    # Run 1 replaced the base, and was replaced by run 3.
    bottom = lineage.hops[2]
    assert bottom.deployments[0].previous.run_id == "base"
    assert bottom.deployments[0].replaced_by.sha256 == loop.c3.sha256
    assert bottom.dataset.num_rows_dropped == 1
    assert bottom.tests == []  # replaced before it was tested
    # The base: its own score, its deployment as the first champion and its sealed test.
    assert [s.exact_match for s in lineage.origin.scores] == [0.25]
    assert [t.exact_match for t in lineage.origin.tests] == [0.1875]
    assert lineage.origin.deployments[0].previous is None

    # Every trace the lineage touches, each dataset's and each deployment's among them.
    assert trace(f"run {loop.c3.run_id}") in lineage.trace_ids
    assert top.dataset.trace_id in lineage.trace_ids and deployment.trace_id in lineage.trace_ids
    assert all(len(t) == 32 for t in lineage.trace_ids) and len(set(lineage.trace_ids)) == len(lineage.trace_ids)


def test_the_lineage_is_plain_json():
    loop = three_runs()
    lineage = build_lineage(loop.history.records(), champion=loop.history.champion, decisions=loop.history.decisions)
    doc = json.loads(json.dumps(msgspec.to_builtins(lineage)))
    assert doc["hops"][0]["checkpoint"]["sha256"] == loop.c3.sha256
    assert doc["hops"][0]["scores"][0]["levels"]["binary/1"]["accuracy"] == 0.75
    assert doc["hops"][0]["tests"][0]["levels"]["binary/1"]["accuracy"] == 0.625
    assert doc["origin"]["kind"] == "base" and doc["served"] is True


def test_without_a_champion_record_the_newest_deployment_is_the_served_model():
    loop = three_runs()
    lineage = build_lineage(loop.history.records())
    assert lineage.model.sha256 == loop.c3.sha256 and lineage.served
    assert lineage.hops[0].deployments[0].decision is None  # no decisions given


def test_nothing_deployed_means_the_base_model_is_served_and_there_is_no_lineage():
    h = LoopHistory()
    c1 = h.run(h.dataset("d1"), BASE_URI)
    lineage = build_lineage(h.records())
    assert lineage.model is None and lineage.hops == [] and lineage.served and not lineage.deployed
    assert "base model" in lineage.summary and "no lineage" in lineage.summary
    # A saved checkpoint can still be explained: it was never deployed.
    named = build_lineage(h.records(), c1.sha256)
    assert not named.deployed and not named.served and "never deployed" in named.summary
    assert [hop.checkpoint.uri for hop in named.hops] == [c1.uri] and named.origin.kind == "base"


def test_the_base_model_served_has_no_lineage_but_its_scores_and_deployment():
    h = LoopHistory()
    base = h.score(f"{BASE_ARTIFACT}/x", sha("base weights"), "base", 0, 0.25, tid=trace("base"))
    h.deploy(base, "first champion (exact_match 0.250)")
    lineage = build_lineage(h.records(), champion=h.champion, decisions=h.decisions)
    assert lineage.served and lineage.hops == [] and lineage.model.run_id == "base"
    assert "the base model is served" in lineage.summary
    assert lineage.origin.kind == "base" and lineage.origin.deployments[0].decision.outcome == "promoted"
    assert build_lineage(h.records(), "base").origin.scores[0].exact_match == 0.25


# ---------------------------------------------------------------------------- naming a model


def test_a_model_is_named_by_sha_prefix_uri_run_or_run_at_step():
    loop = three_runs()
    records = loop.history.records()
    by_prefix = build_lineage(records, loop.c2.sha256[:10].upper())
    assert by_prefix.model.sha256 == loop.c2.sha256 and not by_prefix.served and not by_prefix.deployed
    assert "was never deployed" in by_prefix.summary
    assert [hop.checkpoint.run_id for hop in by_prefix.hops] == [loop.c2.run_id, loop.c1.run_id]
    assert build_lineage(records, loop.c1.uri + "/").model.sha256 == loop.c1.sha256
    assert build_lineage(records, loop.c1.uri.removeprefix("file://")).model.sha256 == loop.c1.sha256
    # A run: its final checkpoint; RUN@STEP: the checkpoint it saved at that step.
    assert build_lineage(records, loop.c2.run_id).model.sha256 == loop.c2.sha256
    at_step = build_lineage(records, f"{loop.c2.run_id}@4")
    assert at_step.model.sha256 == loop.mid2.sha256 and at_step.hops[0].checkpoint.final is False
    # A checkpoint served before, but not now.
    earlier = build_lineage(records, loop.c1.sha256, champion=loop.history.champion)
    assert earlier.deployed and not earlier.served and "was served before" in earlier.summary


def test_an_unknown_model_is_a_lookup_error_listing_what_it_could_match():
    loop = three_runs()
    records = loop.history.records()
    for wrong in ("feedbeef0000", "no-such-run", f"{loop.c1.run_id}@3", f"{loop.c1.run_id}@x",
                  "file:///elsewhere/checkpoints/r/step-00000001"):
        with pytest.raises(LookupError) as raised:
            build_lineage(records, wrong)
        assert isinstance(raised.value, UnknownModel)
        assert raised.value.candidates, wrong
    with pytest.raises(UnknownModel) as raised:
        build_lineage(records, "no-such-run")
    message = str(raised.value)
    assert "'no-such-run'" in message and loop.c3.sha256[:12] in message and loop.c1.run_id in message
    with pytest.raises(UnknownModel, match="saved no checkpoint at step 3"):
        build_lineage(records, f"{loop.c1.run_id}@3")


def test_a_prefix_of_several_checkpoints_is_refused_with_them_listed():
    h = LoopHistory()
    dataset = h.dataset("d")
    a = h.emit(topology.CHECKPOINT_SAVED, CheckpointSaved(
        run_id="r1", step=1, global_step=1, dataset_id=dataset.dataset_id, uri=checkpoint_uri("r1", 1),
        sha256="abcdef12" + "0" * 56, final=True), "")
    b = h.emit(topology.CHECKPOINT_SAVED, CheckpointSaved(
        run_id="r2", step=1, global_step=2, dataset_id=dataset.dataset_id, uri=checkpoint_uri("r2", 2),
        sha256="abcdef12" + "1" * 56, final=True), "")
    with pytest.raises(UnknownModel, match="start of 2 checkpoints") as raised:
        build_lineage(h.records(), "abcdef12")
    assert len(raised.value.candidates) == 2
    assert build_lineage(h.records(), "abcdef121").model.sha256 == b.sha256
    assert build_lineage(h.records(), "abcdef120").model.sha256 == a.sha256
    with pytest.raises(UnknownModel):
        build_lineage(h.records(), "abcdef1")  # fewer than 8 hex digits: not a prefix


# ---------------------------------------------------------------------------- odd histories


def test_a_dataset_trained_twice_and_a_rollback():
    loop = three_runs()
    h = loop.history
    again = h.dataset("curriculum-binary-L1-1-again", rows=6, content="curriculum-binary-L1-1")
    c4 = h.run(again, loop.c3.uri)
    s4 = h.score_checkpoint(c4, 0.875)
    h.deploy(s4, "better beyond the noise: p = 0.0300 <= alpha 0.05")
    h.deploy(h.scores[loop.c3.sha256], f"rollback requested by cli: from {c4.uri}", rollback_from=c4.uri)
    lineage = build_lineage(h.records(), c4.sha256, champion=h.champion, decisions=h.decisions)

    top = lineage.hops[0]
    assert top.dataset.dataset_id == lineage.hops[3].dataset.dataset_id
    assert top.dataset.acceptances == 2 and top.dataset.trained_in == [loop.c1.run_id, c4.run_id]
    assert top.dataset.name == "curriculum-binary-L1-1-again"  # the acceptance this run trained
    assert lineage.hops[3].dataset.name == "curriculum-binary-L1-1"
    [deployment] = top.deployments
    assert deployment.rolled_back and "rollback requested by cli" in deployment.rollback_reason
    assert deployment.replaced_by.sha256 == loop.c3.sha256 and not lineage.served

    served = build_lineage(h.records(), champion=h.champion, decisions=h.decisions)
    assert served.model.sha256 == loop.c3.sha256
    first, second = served.hops[0].deployments
    assert first.kind == "promotion" and first.replaced_by.sha256 == c4.sha256 and not first.rolled_back
    assert second.kind == "rollback" and second.previous.sha256 == c4.sha256
    assert second.decision.outcome == "rolled_back" and second.replaced_by is None


def test_a_re_announced_deployment_counts_once():
    loop = three_runs()
    h = loop.history
    subject, deployed, tid = next(p for p in reversed(h.published) if isinstance(p[1], ModelDeployed))
    # After JetStream's duplicate window, the same event id is stored again.
    h.published.append((subject, msgspec.structs.replace(deployed, time=h._tick()), tid))
    lineage = build_lineage(h.records(), champion=h.champion)
    assert len(lineage.hops[0].deployments) == 1


def test_a_chain_into_aged_out_history_ends_there_and_says_so():
    loop = three_runs()
    h = loop.history
    # The streams dropped everything stored before run 2's dataset was submitted.
    cut = next(i for i, (_, e, _) in enumerate(h.published)
               if isinstance(e, DatasetSubmitted) and e.name == "alice-questions")
    kept = h.records()[cut:]
    lineage = build_lineage(kept, champion=h.champion, decisions=h.decisions)

    assert [hop.checkpoint.run_id for hop in lineage.hops] == [loop.c3.run_id, loop.c2.run_id]
    assert lineage.origin.kind == "aged_out" and lineage.origin.uri == loop.c1.uri
    assert lineage.origin.run_id == loop.c1.run_id and lineage.origin.global_step == 8
    assert "no longer stored" in lineage.summary and "no event stored any more" in lineage.origin.note
    # Run 3's deployment names run 1 as the champion it replaced, known from its URI alone.
    assert lineage.hops[0].deployments[0].previous.run_id == loop.c1.run_id


def test_a_model_whose_run_events_aged_out_is_explained_as_far_as_it_can_be():
    loop = three_runs()
    h = loop.history
    # Only the scores and deployments are left (the TRAINING and DATASETS streams lost everything).
    kept = [r for r in h.records() if r.stream in ("EVALS", "MODELS")]
    lineage = build_lineage(kept, champion=h.champion, decisions=h.decisions)
    [hop] = lineage.hops
    assert hop.checkpoint.sha256 == loop.c3.sha256 and hop.checkpoint.saved is None
    assert hop.checkpoint.run_id == loop.c3.run_id and hop.run is None and hop.scores and hop.deployments
    assert lineage.origin.kind == "aged_out" and any("no event of run" in note for note in hop.notes)


def test_progress_and_other_events_are_ignored():
    loop = three_runs()
    records = loop.history.records()
    assert any(isinstance(r.event, TrainingProgress) for r in records)
    without = [r for r in records if not isinstance(r.event, TrainingProgress)]
    with_progress = build_lineage(records, champion=loop.history.champion)
    assert with_progress.hops == build_lineage(without, champion=loop.history.champion).hops


def test_checkpoint_uris_name_their_run_and_global_step():
    assert parse_checkpoint_uri(checkpoint_uri("ds-abc-123", 250)) == ("ds-abc-123", 250)
    assert parse_checkpoint_uri(checkpoint_uri("ds-abc-123", 250) + "/") == ("ds-abc-123", 250)
    assert parse_checkpoint_uri(BASE_URI) is None


def test_the_base_model_is_named_by_the_uri_runs_started_from():
    loop = three_runs()
    lineage = build_lineage(loop.history.records(), BASE_URI)
    assert lineage.hops == [] and lineage.origin.kind == "base" and lineage.origin.uri == BASE_URI
    assert lineage.model.run_id == "base" and not lineage.served and lineage.deployed
    assert "the base model was served before" in lineage.summary


def test_an_inbox_dataset_names_its_channel_without_a_submission_event():
    h = LoopHistory()
    dataset = h.dataset("dropped-in", channel="inbox")
    saved = h.run(dataset, BASE_URI)
    h.deploy(h.score_checkpoint(saved, 0.5), "first champion")

    [hop] = build_lineage(h.records(), champion=h.champion, decisions=h.decisions).hops

    assert hop.dataset.channel == "inbox" and hop.dataset.submission is None
    assert not any("dataset.submitted" in note for note in hop.notes)
