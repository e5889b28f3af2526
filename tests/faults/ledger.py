"""What became of every event, read from the streams and KV (never from logs).

`Ledger.read` takes the streams as they are stored now, each durable consumer's ack floor, the
deployer's decisions and the curriculum's counted evaluations; `outcome` then says for one
message on a consumed subject what its consumer made of it:

- dead-lettered: on `deadletter.<subject>`, by this consumer, with a reason header;
- unsettled: above the consumer's ack floor (still queued, in progress or waiting to retry);
- rejected / handled: settled, and what the handler stands for is there: a verdict for a
  submission (rejected: with its report), a finished or finally failed run for an accepted
  dataset, a score for a final checkpoint, a recorded decision for a score, a counted evaluation;
- LOST: settled, but neither handled nor dead-lettered, or dead-lettered without a reason.

`check(since)` applies the suite's invariants to what was published after `since` (stream
sequences): nothing lost, nothing unsettled, one verdict per submission, no dataset trained
twice (two different finished runs for one dataset id; a run's events are republished with the
same ids, so distinct run ids are what count).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

from libs.common import topology
from libs.common.bus import CONSUMER_HEADER, ORIGINAL_ID_HEADER, REASON_HEADER, SUBJECT_HEADER, Bus
from libs.common.events import (
    AnyEvent,
    CheckpointSaved,
    DatasetAccepted,
    DatasetRejected,
    DatasetSubmitted,
    EvalScored,
    ModelDeployed,
    ModelDeployFailed,
    ModelStaged,
    TrainingFailed,
    TrainingFinished,
    derived_id,
)
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, skill_state
from libs.common.stored import stored
from services.gatekeeper.intake import submission_id_for

_decoder = msgspec.json.Decoder(AnyEvent)
# What each service consumes as a durable consumer (inference follows model.* on every replica).
CONSUMERS_OF = {
    "gatekeeper": (topology.GATEKEEPER,),
    "trainer": topology.TRAINER,
    "evaluator": (topology.EVALUATOR,),
    "deployer": (topology.DEPLOYER, topology.DEPLOYER_SERVING),
    "curriculum": (topology.CURRICULUM,),
    "inference": (),
}
_STREAM_SUBJECTS = {
    "DATASETS": ("dataset.>",),
    "TRAINING": (topology.TRAINING_STARTED, topology.TRAINING_FINISHED, topology.TRAINING_FAILED,
                 topology.CHECKPOINT_SAVED),
    "EVALS": ("eval.>",),
    "MODELS": ("model.>",),
    "DEADLETTER": ("deadletter.>",),
}
STREAMS = tuple(_STREAM_SUBJECTS)


@dataclass(frozen=True)
class Stored:
    stream: str
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time: datetime | None
    event: object | None  # None: the body is no event


@dataclass(frozen=True)
class Outcome:
    kind: str  # handled | rejected | dead-lettered | unsettled | LOST
    detail: str = ""

    @property
    def lost(self) -> bool:
        return self.kind == "LOST"


@dataclass
class Check:
    """The invariants over one window of the streams."""

    events: int = 0
    lost: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    trained_twice: list[str] = field(default_factory=list)
    verdicts_not_one: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unsettled or self.trained_twice or self.verdicts_not_one)

    def describe(self) -> str:
        problems = [f"{name}: {items[:5]}" for name, items in (
            ("lost", self.lost), ("unsettled", self.unsettled), ("trained twice", self.trained_twice),
            ("verdicts", self.verdicts_not_one)) if items]
        return "; ".join(problems) or "ok"


class Ledger:
    def __init__(self) -> None:
        self.messages: dict[str, list[Stored]] = {s: [] for s in STREAMS}
        self.ack_floor: dict[str, int] = {}
        self.decided: set[str] = set()  # checkpoint sha256 with a recorded deployer decision
        self.decision_ids: set[str] = set()
        self.counted: set[str] = set()  # champions (checkpoint sha256) whose scores the curriculum counted
        self.champions: set[str] = set()  # every checkpoint the champion record has named

    # ------------------------------------------------------------------ reading

    @classmethod
    async def read(cls, bus: Bus) -> Ledger:
        ledger = cls()
        # Consumers first: a message settled after this read is then at worst "unsettled", never "lost".
        for spec in topology.CONSUMERS:
            info = await bus.js.consumer_info(spec.stream, spec.durable)
            ledger.ack_floor[spec.durable] = info.ack_floor.stream_seq
        decisions, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
        for decision in decisions.decisions if decisions else []:
            ledger.decided.add(decision.checkpoint_sha256)
            ledger.decision_ids.add(decision.id)
        state, _ = await (await bus.record(skill_state("binary"))).read()
        ledger.counted = {key.partition(":")[0] for key in state.champion_scores} if state else set()
        ledger.champions = {c.checkpoint_sha256 for c in await (await bus.record(CHAMPION)).history()}
        for stream, subjects in _STREAM_SUBJECTS.items():
            for subject in subjects:
                async for msg in stored(bus.js, stream, subject):
                    try:
                        event = _decoder.decode(msg.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        event = None
                    ledger.messages[stream].append(Stored(
                        stream, msg.metadata.sequence.stream, msg.subject, dict(msg.headers or {}), msg.data,
                        msg.metadata.timestamp, event))
            ledger.messages[stream].sort(key=lambda m: m.seq)
        ledger._index()
        return ledger

    def _index(self) -> None:
        self.verdicts: dict[str, set[str]] = defaultdict(set)
        self.rejected: dict[str, DatasetRejected] = {}
        self.runs: dict[str, set[str]] = defaultdict(set)
        self.failed_for_good: dict[str, TrainingFailed] = {}
        self.scored: dict[str, EvalScored] = {}
        self.staged: dict[str, ModelStaged] = {}
        self.deployed: dict[str, ModelDeployed] = {}
        self.deploy_failed: dict[str, ModelDeployFailed] = {}
        self.dead_letters: dict[tuple, Stored] = {}
        for m in self.all():
            e = m.event
            if isinstance(e, DatasetAccepted | DatasetRejected):
                self.verdicts[e.submission_id].add(e.id)
                if isinstance(e, DatasetRejected):
                    self.rejected[e.submission_id] = e
            elif isinstance(e, TrainingFinished):
                self.runs[e.dataset_id].add(e.run_id)
            elif isinstance(e, TrainingFailed) and not e.will_retry:
                self.failed_for_good[e.dataset_id] = e
            elif isinstance(e, EvalScored):
                self.scored[e.checkpoint_sha256] = e
            elif isinstance(e, ModelStaged):
                self.staged[e.checkpoint_sha256] = e
            elif isinstance(e, ModelDeployed):
                self.deployed[e.checkpoint_sha256] = e
            elif isinstance(e, ModelDeployFailed):
                self.deploy_failed[e.deployment_id] = e
            if m.stream == "DEADLETTER":
                consumer, original = m.headers.get(CONSUMER_HEADER, ""), m.headers.get(ORIGINAL_ID_HEADER, "")
                subject = m.headers.get(SUBJECT_HEADER, "")
                self.dead_letters[(consumer, original) if original else (consumer, subject, m.data)] = m

    def all(self):
        for stream in STREAMS:
            yield from self.messages[stream]

    def last_seqs(self) -> dict[str, int]:
        return {s: (msgs[-1].seq if msgs else 0) for s, msgs in self.messages.items()}

    # ------------------------------------------------------------------ what happened

    def on(self, spec: topology.ConsumerSpec, since: dict[str, int] | None = None) -> list[Stored]:
        """The messages `spec` consumes (after `since`)."""
        start = (since or {}).get(spec.stream, 0)
        return [m for m in self.messages[spec.stream]
                if m.seq > start and _matches(spec.filter_subject, m.subject)]

    def message(self, stream: str, seq: int) -> Stored | None:
        return next((m for m in self.messages[stream] if m.seq == seq), None)

    def dead_letter(self, durable: str, msg: Stored) -> Stored | None:
        original = msg.headers.get("Nats-Msg-Id", "")
        return self.dead_letters.get((durable, original) if original else (durable, msg.subject, msg.data))

    def outcome(self, spec: topology.ConsumerSpec, msg: Stored) -> Outcome:
        if letter := self.dead_letter(spec.durable, msg):
            reason = letter.headers.get(REASON_HEADER, "")
            return Outcome("dead-lettered", reason[:120]) if reason else Outcome("LOST", "dead letter without a reason")
        if msg.seq > self.ack_floor.get(spec.durable, 0):
            return Outcome("unsettled", f"{spec.durable} ack floor {self.ack_floor.get(spec.durable, 0)}")
        e = msg.event
        if e is None:
            return Outcome("LOST", "undecodable, settled without a dead letter")
        if isinstance(e, DatasetSubmitted):
            verdicts = self.verdicts.get(submission_id_for(e.id))
            if not verdicts:
                return Outcome("LOST", "no verdict")
            if rejected := self.rejected.get(submission_id_for(e.id)):
                return Outcome("rejected", f"report {Path(rejected.report_uri).name}: {'; '.join(rejected.reasons)[:80]}")
            return Outcome("handled", "accepted")
        if isinstance(e, DatasetAccepted):
            if runs := self.runs.get(e.dataset_id):
                return Outcome("handled", f"trained ({', '.join(sorted(runs))})")
            if failed := self.failed_for_good.get(e.dataset_id):
                return Outcome("handled", f"failed for good: {failed.error[:80]}")
            return Outcome("LOST", "neither trained nor failed")
        if isinstance(e, CheckpointSaved):
            if not e.final:
                return Outcome("handled", "intermediate checkpoint")
            return Outcome("handled", "scored") if e.sha256 in self.scored else Outcome("LOST", "final, never scored")
        if isinstance(e, EvalScored) and spec.durable == topology.DEPLOYER.durable:
            if e.checkpoint_sha256 in self.decided or e.checkpoint_sha256 in self.deployed:
                return Outcome("handled", "decided")
            return Outcome("LOST", "no deployer decision")
        if isinstance(e, ModelDeployed) and spec.durable == topology.CURRICULUM.durable:
            if e.checkpoint_sha256 in self.counted:
                return Outcome("handled", "the champion's score counted")
            if e.checkpoint_sha256 not in self.champions:
                return Outcome("handled", "never the champion: nothing to count")
            return Outcome("LOST", "a champion's score not counted")
        return Outcome("handled", "acked")

    def deployment_resolved(self, deployment_id: str) -> bool:
        return (deployment_id in self.deploy_failed
                or derived_id("deployer", "decision", deployment_id) in self.decision_ids)

    def blessed(self, sha256: str) -> bool:
        """Scored, then staged or deployed by the deployer: what may be served."""
        return sha256 in self.scored and (sha256 in self.staged or sha256 in self.deployed)

    # ------------------------------------------------------------------ invariants

    def check(self, since: dict[str, int] | None = None) -> Check:
        check = Check()
        counts: dict[str, int] = defaultdict(int)
        for spec in topology.CONSUMERS:
            for msg in self.on(spec, since):
                check.events += 1
                outcome = self.outcome(spec, msg)
                counts[outcome.kind] += 1
                where = f"{spec.durable}:{msg.subject}#{msg.seq}"
                if outcome.lost:
                    check.lost.append(f"{where} ({outcome.detail})")
                elif outcome.kind == "unsettled":
                    check.unsettled.append(where)
        check.outcomes = dict(counts)
        start = (since or {}).get("DATASETS", 0)
        for m in self.messages["DATASETS"]:
            if m.seq <= start:
                continue
            if isinstance(m.event, DatasetSubmitted):
                sid = submission_id_for(m.event.id)
                if len(self.verdicts.get(sid, ())) > 1:
                    check.verdicts_not_one.append(f"{sid}: {len(self.verdicts[sid])} verdicts")
            if isinstance(m.event, DatasetAccepted) and len(self.runs.get(m.event.dataset_id, ())) > 1:
                check.trained_twice.append(f"{m.event.dataset_id[:12]}: runs {sorted(self.runs[m.event.dataset_id])}")
        check.trained_twice = sorted(set(check.trained_twice))
        return check


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p and p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))
