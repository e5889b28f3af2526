"""`flywheel lineage` speed on a day of the loop's history, against replaying every stream.

    .venv/bin/python -m bench.lineage [--runs 300] [--repeats 5] [--data-dir DIR]

Starts a real nats-server on a fresh store (a temporary folder by default) and publishes, through
the `Bus`, what a day of the loop leaves in the streams: the base model scored and served, then
for each of --runs runs, each trained from the previous run's final checkpoint: its dataset
(`dataset.submitted`: for two in three, a curriculum dataset with its 1,000 rows inline, ~300 kB,
as the curriculum publishes it; else a hard-examples dataset by URI; then `dataset.accepted`),
the run (`training.started`, one in ten failing once and resuming, 25 `training.progress`, a
`checkpoint.saved` every 50 of its 125 steps and the final one, `training.finished`), its score
(`eval.scored` on a 480-item suite: per-item outcomes, 7 levels), and for one in five a promotion
(`model.staged`, `model.serving`, `model.deployed`; the champion and the deployer's last 100
decisions in KV), with a curriculum level change now and then. Each run's events share a trace.

Then it times `read_lineage` for the served model, the newest champion (its chain goes back
through every run to the base): the median of --repeats reads, with a breakdown (reading the
streams and KV, the rows-free read of `dataset.submitted` within it, building the lineage); the
baseline, what a naive implementation does: every stream read in full and decoded
(`read_history` on every subject, inline rows and progress included), then the same build; and
the served model's lineage again after the server restarts on the same store (the same lineage).
Target: the lineage in under a second. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import msgspec
from opentelemetry import context

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import (
    CheckpointSaved,
    CurriculumLevelChanged,
    DatasetAccepted,
    DatasetSubmitted,
    EvalScored,
    Event,
    LevelScore,
    ModelServing,
    ModelStaged,
    TrainingFailed,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
    derived_id,
    encode_outcomes,
    utcnow,
)
from libs.common.history import read_history
from libs.common.lineage import (
    build_lineage,
    read_lineage,
    read_records,
    read_submissions,
)
from libs.common.log import setup_logging
from libs.common.nats_server import NatsServer
from libs.common.records import (
    CHAMPION,
    DEPLOY_DECISIONS,
    Champion,
    DeployDecision,
    DeployDecisions,
)
from libs.common.tracing import extract_context

TARGETS = {"lineage_s": 1.0}
STORE = "file:///srv/flywheel/data/artifacts"
BASE_URI = "file:///srv/flywheel/data/models/tiny-qwen3"
SUITE_ITEMS = 480
LEVELS = [f"binary/{n}" for n in range(1, 8)]
STEPS, SAVE_EVERY, PROGRESS_EVERY = 125, 50, 5
DECISIONS_KEPT = 100


def _sha(*key: object) -> str:
    return hashlib.sha256(":".join(map(str, key)).encode()).hexdigest()


def _checkpoint_uri(run_id: str, global_step: int) -> str:
    return f"{STORE}/checkpoints/{run_id}/step-{global_step:08d}"


class Day:
    """A day of the loop's events, in the order the services publish them, each with its trace id."""

    def __init__(self, runs: int, seed: int = 0) -> None:
        from libs.common.skills import binary

        self.rng = random.Random(seed)
        # The curriculum's rows for each level, made once: what matters here is their size.
        self.rows = {level: [{"messages": r["messages"]} for r in binary.generate(level, 1000, seed=level)]
                     for level in range(1, 4)}
        self.events: list[tuple[str, Event, str]] = []
        self.decisions: list[DeployDecision] = []
        self.champion: Champion | None = None
        self.champion_score: EvalScored | None = None
        self.global_step = 0
        self.level = 1
        self.weights = BASE_URI
        self.base()
        for i in range(runs):
            self.run(i)

    def emit(self, subject: str, event: Event, trace_id: str) -> None:
        self.events.append((subject, event, trace_id))

    def trace(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def score(self, run_id: str, step: int, uri: str, sha256: str, skill: float, trace_id: str) -> EvalScored:
        per_level = SUITE_ITEMS // len(LEVELS)
        correct = [self.rng.random() < max(0.02, skill - 0.1 * n) for n in range(len(LEVELS))
                   for _ in range(per_level)]
        correct += [False] * (SUITE_ITEMS - len(correct))
        levels = {}
        for n, key in enumerate(LEVELS):
            hits = sum(correct[n * per_level:(n + 1) * per_level])
            acc = hits / per_level
            levels[key] = LevelScore(correct=hits, total=per_level, accuracy=acc, low=max(0.0, acc - 0.1),
                                     high=min(1.0, acc + 0.1), val_loss=1.0 - acc / 2)
        exact = sum(correct) / SUITE_ITEMS
        champion = self.champion_score
        event = EvalScored(
            id=derived_id("evaluator", sha256, "v1"), run_id=run_id, step=step, checkpoint_uri=uri,
            checkpoint_sha256=sha256, suite="binary", suite_version="v1", exact_match=exact, val_loss=1.0 - exact / 2,
            num_examples=SUITE_ITEMS, by_level={k: v.accuracy for k, v in levels.items()},
            exact_match_low=max(0.0, exact - 0.05), exact_match_high=min(1.0, exact + 0.05), levels=levels,
            outcomes=encode_outcomes(correct), ece=0.05,
            regressions=["binary/3 accuracy down 6.0 points"] if champion and self.rng.random() < 0.2 else [],
            compared_with=champion.checkpoint_sha256 if champion else "", source="evaluator",
        )
        self.emit(topology.EVAL_SCORED, event, trace_id)
        return event

    def decide(self, score: EvalScored, trace_id: str, promote: bool) -> None:
        reason = (f"better beyond the noise: exact one-sided sign test p = 0.0{self.rng.randrange(10, 49)} <= alpha 0.05 "
                  f"(exact_match {score.exact_match:.3f} vs {self.champion.exact_match:.3f})" if self.champion
                  else f"first champion (exact_match {score.exact_match:.3f})")
        now = utcnow()
        decision = DeployDecision(
            id=derived_id("deployer", "decision", score.id), time=now, outcome="promoted" if promote else "kept",
            reason=reason if promote else "not better beyond the noise: p = 0.4100 > alpha 0.05",
            checkpoint_uri=score.checkpoint_uri, checkpoint_sha256=score.checkpoint_sha256, run_id=score.run_id,
            suite_version="v1", champion_sha256=self.champion.checkpoint_sha256 if self.champion else "")
        self.decisions = [*self.decisions, decision][-DECISIONS_KEPT:]
        if not promote:
            return
        deployment_id = derived_id("deployer", "deployment", score.id)
        self.emit(topology.MODEL_STAGED, ModelStaged(
            deployment_id=deployment_id, kind="promotion", checkpoint_uri=score.checkpoint_uri,
            checkpoint_sha256=score.checkpoint_sha256, run_id=score.run_id, step=score.step, reason=reason,
            deadline=now + timedelta(seconds=120), source="deployer"), trace_id)
        self.emit(topology.MODEL_SERVING, ModelServing(
            deployment_id=deployment_id, replica="inference-1", ok=True, checkpoint_sha256=score.checkpoint_sha256,
            checkpoint_uri=score.checkpoint_uri, source="inference"), trace_id)
        self.champion = Champion(
            checkpoint_uri=score.checkpoint_uri, checkpoint_sha256=score.checkpoint_sha256, run_id=score.run_id,
            step=score.step, exact_match=score.exact_match, val_loss=score.val_loss or 0.0, suite_version="v1",
            deployed_at=now, event_id=derived_id("deployer", "deploy", score.checkpoint_sha256), reason=reason,
            previous_checkpoint_uri=self.champion.checkpoint_uri if self.champion else "", eval_id=score.id,
            num_examples=score.num_examples, outcomes=score.outcomes, levels=score.levels)
        self.champion_score = score
        announced = self.champion.announcement()
        self.emit(topology.MODEL_DEPLOYED, msgspec.structs.replace(announced, source="deployer"), trace_id)

    def base(self) -> None:
        trace_id = self.trace()
        sha256 = _sha("base")
        score = self.score("base", 0, f"{STORE}/models/base/{sha256}", sha256, 0.15, trace_id)
        self.decide(score, trace_id, promote=True)

    def run(self, i: int) -> None:
        trace_id = self.trace()
        inline = i % 3 != 2
        name = f"curriculum-binary-L{self.level}-{i}" if inline else f"hard-examples-{i}"
        submission = DatasetSubmitted(
            id=derived_id("curriculum", "synthetic", "binary", i), name=name, priority="low",
            rows=self.rows[self.level] if inline else None,
            uri=None if inline else f"{STORE}/hard-examples/{i}.jsonl", sha256=None if inline else _sha("hard", i),
            submitted_by="curriculum" if inline else "evaluator", channel="curriculum" if inline else "hard-examples",
            source="curriculum" if inline else "evaluator")
        self.emit(topology.DATASET_SUBMITTED, submission, trace_id)
        dataset_id = _sha("dataset", i)
        rows = 1000 if inline else 40
        accepted = DatasetAccepted(
            dataset_id=dataset_id, name=name, uri=f"{STORE}/datasets/{dataset_id}.jsonl", sha256=dataset_id,
            schema="chat_sft_v1", priority="low", num_rows=rows - i % 4, num_rows_dropped=i % 4,
            report_uri=f"{STORE}/reports/{dataset_id}.json", submission_id=submission.id, source="gatekeeper")
        self.emit(topology.dataset_accepted("low"), accepted, trace_id)

        run_id = f"ds-{dataset_id[:12]}-{_sha(self.weights)[:8]}"
        base_step, start, final = self.global_step, 0, None
        fail_at = 70 if i % 10 == 9 else None
        while True:
            self.emit(topology.TRAINING_STARTED, TrainingStarted(
                run_id=run_id, dataset_id=dataset_id, init_weights=self.weights, total_steps=STEPS, start_step=start,
                global_step=base_step + start, source="trainer"), trace_id)
            failed = False
            for step in range(start + 1, STEPS + 1):
                if step % PROGRESS_EVERY == 0:
                    self.emit(topology.TRAINING_PROGRESS, TrainingProgress(
                        run_id=run_id, dataset_id=dataset_id, step=step, total_steps=STEPS, global_step=base_step + step,
                        loss=2.0 / (1 + step / 20), learning_rate=1e-4, tokens_per_second=850.0, source="trainer"),
                        trace_id)
                if step % SAVE_EVERY == 0 or step == STEPS:
                    uri = _checkpoint_uri(run_id, base_step + step)
                    final = CheckpointSaved(
                        id=derived_id("trainer", "checkpoint", run_id, step), run_id=run_id, step=step,
                        global_step=base_step + step, dataset_id=dataset_id, uri=uri, sha256=_sha("weights", uri),
                        final=step == STEPS, source="trainer")
                    self.emit(topology.CHECKPOINT_SAVED, final, trace_id)
                if step == fail_at:
                    self.emit(topology.TRAINING_FAILED, TrainingFailed(
                        run_id=run_id, dataset_id=dataset_id, error="RuntimeError('worker lost')", will_retry=True,
                        source="trainer"), trace_id)
                    fail_at, start, failed = None, SAVE_EVERY, True
                    break
            if not failed:
                break
        self.global_step = base_step + STEPS
        self.emit(topology.TRAINING_FINISHED, TrainingFinished(
            run_id=run_id, dataset_id=dataset_id, global_step=self.global_step, final_loss=0.3,
            checkpoint_uri=final.uri, duration_s=310.0, source="trainer"), trace_id)
        self.weights = final.uri
        score = self.score(run_id, STEPS, final.uri, final.sha256, min(0.95, 0.2 + i / 200), trace_id)
        self.decide(score, trace_id, promote=i % 5 == 4)
        if i % 40 == 39 and self.level < 3:
            self.emit(topology.CURRICULUM_LEVEL_CHANGED, CurriculumLevelChanged(
                skill="binary", previous_level=self.level, level=self.level + 1, accuracy=0.92,
                reason="mastered", source="curriculum"), trace_id)
            self.level += 1


async def publish(bus: Bus, day: Day) -> None:
    """Every event within its trace, a run's worth at a time (in order: sent before their acks are awaited)."""
    pending = []

    async def one(subject: str, event: Event, trace_id: str, n: int) -> None:
        token = context.attach(extract_context({"traceparent": f"00-{trace_id}-{n + 1:016x}-01"}))
        try:
            await bus.publish(subject, event, timeout=60)
        finally:
            context.detach(token)

    for n, (subject, event, trace_id) in enumerate(day.events):
        pending.append(asyncio.ensure_future(one(subject, event, trace_id, n)))
        if len(pending) >= 64:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await (await bus.record(CHAMPION)).write(day.champion, 0)
    await (await bus.record(DEPLOY_DECISIONS)).write(DeployDecisions(decisions=day.decisions), 0)


async def timed(repeats: int, measure) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = await measure()
        seconds.append(time.perf_counter() - started)
    return seconds, result


ALL_SUBJECTS = tuple(s for spec in topology.STREAMS if spec.name != "DEADLETTER" for s in spec.subjects)


async def full_replay(bus: Bus):
    """The naive way: every stream read and decoded in full, then the same build."""
    records = await read_history(bus, ALL_SUBJECTS)
    champion, _ = await (await bus.record(CHAMPION)).read()
    decisions, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
    return build_lineage(records, champion=champion, decisions=decisions.decisions if decisions else []), len(records)


async def measure(url: str, repeats: int) -> dict:
    bus = await Bus.connect([url], "bench")
    try:
        await bus.ensure_topology()
        await read_lineage(bus)  # warm: the connection, the JetStream context, the KV handles
        seconds, lineage = await timed(repeats, lambda: read_lineage(bus))
        read_s, (records, champion, decisions) = await timed(repeats, lambda: read_records(bus))
        submissions_s, _ = await timed(repeats, lambda: read_submissions(bus))
        build_s, _ = await timed(repeats, lambda: _build(records, champion, decisions))
        replay_s, (replayed, replay_events) = await timed(max(1, repeats // 2), lambda: full_replay(bus))
        assert msgspec.to_builtins(replayed) == msgspec.to_builtins(lineage), "the full replay found another lineage"
        return {"lineage_s": seconds, "read_s": read_s, "submissions_s": submissions_s, "build_s": build_s,
                "full_replay_s": replay_s, "lineage": lineage, "replay_events": replay_events}
    finally:
        await bus.close()


async def _build(records, champion, decisions):
    return build_lineage(records, champion=champion, decisions=decisions)


async def restarted(url: str, repeats: int) -> tuple[list[float], object]:
    bus = await Bus.connect([url], "bench")
    try:
        started = time.perf_counter()
        first = await read_lineage(bus)
        cold = time.perf_counter() - started
        seconds, _ = await timed(repeats, lambda: read_lineage(bus))
        return [cold, *seconds], first
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="runs in the history (default 300, a day of the loop)")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads of each kind (default 5; the median counts)")
    parser.add_argument("--data-dir", type=Path, help="where nats-server keeps its store (default: a temporary folder)")
    args = parser.parse_args(argv)
    setup_logging("bench", "warning")  # not the bus's "nats disconnected" at each close

    with tempfile.TemporaryDirectory(prefix="bench-lineage-") as tmp:
        store = (args.data_dir or Path(tmp)) / "nats"
        started = time.perf_counter()
        day = Day(args.runs)
        kinds: dict[str, int] = {}
        for subject, _, _ in day.events:
            kinds[subject] = kinds.get(subject, 0) + 1
        print(f"generated a day of the loop: {args.runs} runs, {len(day.events):,} events "
              f"({', '.join(f'{n:,} {s}' for s, n in sorted(kinds.items(), key=lambda kv: -kv[1]))}) "
              f"in {time.perf_counter() - started:.1f} s")

        server = NatsServer(store)
        url = server.start()
        try:
            async def go():
                bus = await Bus.connect([url], "bench")
                try:
                    await bus.ensure_topology()
                    t = time.perf_counter()
                    await publish(bus, day)
                    published_s = time.perf_counter() - t
                    sizes = {s.name: (await bus.js.stream_info(s.name)).state for s in topology.STREAMS}
                    return published_s, sizes
                finally:
                    await bus.close()

            published_s, sizes = asyncio.run(go())
            total_bytes = sum(state.bytes for state in sizes.values())
            print(f"published them on nats-server ({store}) in {published_s:.1f} s: " + ", ".join(
                f"{name} {state.messages:,} msgs {state.bytes / 1e6:.1f} MB" for name, state in sizes.items()
                if state.messages))
            result = asyncio.run(measure(url, args.repeats))
        finally:
            server.stop()

        lineage = result["lineage"]
        print(f"served model: {lineage.summary}")
        print(f"  {lineage.events_read:,} events used of {len(day.events):,}; {len(lineage.trace_ids)} trace ids")
        lineage_s = statistics.median(result["lineage_s"])
        replay_s = statistics.median(result["full_replay_s"])
        print(f"read_lineage (the streams and KV it needs, then the build): median {lineage_s * 1000:.0f} ms of "
              f"{', '.join(f'{s * 1000:.0f}' for s in result['lineage_s'])} ms")
        print(f"  reading: {statistics.median(result['read_s']) * 1000:.0f} ms, of which dataset.submitted without its "
              f"rows: {statistics.median(result['submissions_s']) * 1000:.0f} ms; building: "
              f"{statistics.median(result['build_s']) * 1000:.0f} ms")
        print(f"baseline, every stream read and decoded in full ({result['replay_events']:,} messages), then the "
              f"same build: median {replay_s * 1000:.0f} ms of "
              f"{', '.join(f'{s * 1000:.0f}' for s in result['full_replay_s'])} ms (the same lineage)")

        server = NatsServer(store)
        url = server.start()
        try:
            after, again = asyncio.run(restarted(url, args.repeats))
        finally:
            server.stop()
        same = msgspec.to_builtins(again) == msgspec.to_builtins(lineage)
        after_s = statistics.median(after[1:]) if len(after) > 1 else after[0]
        print(f"after restarting nats-server on the same store: first read {after[0] * 1000:.0f} ms, then median "
              f"{after_s * 1000:.0f} ms; the same lineage: {same}")

    summary = {
        "runs": args.runs,
        "events": len(day.events),
        "stream_bytes": total_bytes,
        "chain_length": len(lineage.hops),
        "events_used": lineage.events_read,
        "lineage_s": round(lineage_s, 4),
        "read_s": round(statistics.median(result["read_s"]), 4),
        "submissions_s": round(statistics.median(result["submissions_s"]), 4),
        "build_s": round(statistics.median(result["build_s"]), 4),
        "full_replay_s": round(replay_s, 4),
        "speedup_vs_full_replay": round(replay_s / lineage_s, 1),
        "after_restart_first_s": round(after[0], 4),
        "after_restart_s": round(after_s, 4),
        "same_after_restart": same,
        "target_s": TARGETS["lineage_s"],
        "met": {"lineage_s": lineage_s < TARGETS["lineage_s"]},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
