"""The small shared facts kept in JetStream KV: each bucket's keys and their record types.

One owner writes each record (deployer: the champion, its decisions and its newest deployment;
trainer: its control state;
curriculum: each skill's state; the bus: each queued message's failures); anyone may read it (inference loads the champion, `flywheel
status` and the dashboard show them all). Reading and compare-and-set writing go through
`libs.common.kv.Record`. Record types never forbid unknown fields: a reader ignores what a
newer writer added.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

import msgspec

from libs.common import topology
from libs.common.events import DeploymentKind, LevelScore, ModelDeployed, utcnow

R = TypeVar("R", bound=msgspec.Struct)


@dataclass(frozen=True)
class Key(Generic[R]):
    """Where a record lives (bucket and key) and what it decodes as."""

    bucket: topology.BucketSpec
    key: str
    kind: type[R]


# ---------------------------------------------------------------------------- champion


class Champion(msgspec.Struct, kw_only=True, frozen=True):
    """The checkpoint being served (bucket `champion`, key `current`), written by the deployer."""

    checkpoint_uri: str
    checkpoint_sha256: str
    run_id: str
    step: int
    exact_match: float
    val_loss: float
    suite_version: str
    deployed_at: datetime
    # The ModelDeployed event that announced this record (re-announced with the same id).
    event_id: str
    reason: str = ""
    previous_checkpoint_uri: str = ""
    kind: Literal["promotion", "rollback"] = "promotion"
    # The champion's own score on `suite_version` (from the EvalScored `eval_id`), what a
    # candidate is compared with item by item: per-item outcomes (EvalScored.outcomes) and levels.
    eval_id: str = ""
    num_examples: int = 0
    outcomes: str = ""
    levels: dict[str, LevelScore] = {}
    # Runs whose champion was rolled back (newest last, at most ROLLED_BACK_KEPT): never promoted
    # again. Carried from record to record, so the bucket's history depth never forgets them.
    rolled_back_runs: list[str] = []
    # Per level, the best score any champion had on `best_suite_version`: no candidate may be below
    # it by more than max_level_drop. Kept by a rollback, started afresh when the suite changes.
    best_levels: dict[str, LevelScore] = {}
    best_suite_version: str = ""

    def announcement(self) -> ModelDeployed:
        """The ModelDeployed event for this record; the same every time it is built."""
        return ModelDeployed(
            id=self.event_id,
            time=self.deployed_at,
            checkpoint_uri=self.checkpoint_uri,
            checkpoint_sha256=self.checkpoint_sha256,
            run_id=self.run_id,
            step=self.step,
            exact_match=self.exact_match,
            val_loss=self.val_loss,
            reason=self.reason,
            previous_checkpoint_uri=self.previous_checkpoint_uri,
        )


CHAMPION = Key(topology.CHAMPION_BUCKET, "current", Champion)
ROLLED_BACK_KEPT = 256


class CandidatesTested(msgspec.Struct, kw_only=True, frozen=True):
    """The candidates tested against one champion (bucket `champion`, key `candidates`), written by the
    deployer: the count its false-promotion rate is controlled over (services/deployer/promotion.py).

    Its own key, not fields of the champion record: a write per tested candidate would crowd the
    64 values the bucket keeps of `current`, whose history is the rollback stack, the curriculum's
    record of champion scores and the checkpoints retention keeps as once served.
    """

    # The champion record they were tested against (`Champion.event_id`): another one starts afresh.
    champion_event_id: str
    count: int = 0
    # The newest candidates' keys ("<sha256>@<suite version>"), so a score decided again keeps its number.
    keys: list[str] = []


CANDIDATES_TESTED = Key(topology.CHAMPION_BUCKET, "candidates", CandidatesTested)

DecisionOutcome = Literal["promoted", "kept", "refused", "rescored", "rolled_back", "deploy_failed"]


class DeployDecision(msgspec.Struct, kw_only=True, frozen=True):
    """One decision of the deployer, with its reason in words (and numbers)."""

    # Derived from what was decided on (the score event, the request): recorded once.
    id: str
    time: datetime
    # promoted: the candidate is served; kept: the champion stays (not past the screen, not confirmed,
    # a regression, or the champion not yet scored on the candidate's suite); refused: the
    # candidate may never be served (rolled-back run, non-finite loss, no per-item outcomes, a
    # manual deploy of an unscored checkpoint); rescored: the champion's score on a new suite is
    # recorded; rolled_back: the previous champion is served again; deploy_failed: a promotion,
    # manual deploy or rollback was staged but never served (the reason says why), the champion stays.
    # Promoted and rolled_back are recorded once inference serves the checkpoint.
    outcome: DecisionOutcome
    reason: str
    checkpoint_uri: str
    checkpoint_sha256: str
    run_id: str = ""
    suite_version: str = ""
    # The champion when the decision was made ("" when there was none).
    champion_sha256: str = ""
    # eval.scored, or who asked (cli, http, ...).
    requested_by: str = "eval.scored"


class DeployDecisions(msgspec.Struct, kw_only=True, frozen=True):
    """The deployer's last decisions, oldest first (bucket `champion`, key `decisions`)."""

    decisions: list[DeployDecision] = []


DEPLOY_DECISIONS = Key(topology.CHAMPION_BUCKET, "decisions", DeployDecisions)

# ---------------------------------------------------------------------------- deployment

DeploymentState = Literal["staged", "served", "failed"]


class Deployment(msgspec.Struct, kw_only=True, frozen=True):
    """The deployer's newest deployment and what became of it (bucket `champion`, key `deployment`).

    staged: `model.staged` asks inference to load `candidate`; served: a replica reported serving
    its sha256, and `candidate` is (or is about to be) the champion record; failed: it never will
    be, `reason` says why, the champion stays. Each change is one compare-and-set of this record,
    so exactly one outcome wins; what follows from it (the champion record, the events, the
    decision) is idempotent and `settled` once done, so a restarted deployer finishes it.
    """

    id: str
    kind: DeploymentKind
    state: DeploymentState = "staged"
    staged_at: datetime
    deadline: datetime
    # The champion record to write once a replica serves the checkpoint.
    candidate: Champion
    # The champion's checkpoint when this was decided ("" none): if another is champion by the
    # time a replica reports, this deployment fails rather than replace what it was not weighed against.
    replaces_sha256: str = ""
    # Recorded in DEPLOY_DECISIONS once final (with outcome deploy_failed and `reason` if it failed).
    decision: DeployDecision
    reason: str = ""
    served_by: str = ""
    resolved_at: datetime | None = None
    settled: bool = False
    # Staged deployments this one replaced (failed, "replaced by ..."), until their failure is announced.
    replaced: list[Deployment] = []

    @property
    def checkpoint_sha256(self) -> str:
        return self.candidate.checkpoint_sha256


DEPLOYMENT = Key(topology.CHAMPION_BUCKET, "deployment", Deployment)

# ---------------------------------------------------------------------------- trainer control

TrainerMode = Literal["running", "paused", "stopped"]


class TrainerControl(msgspec.Struct, frozen=True, kw_only=True):
    """The trainer's persisted control mode (bucket `trainer`, key `state`)."""

    mode: TrainerMode = "running"
    requested_by: str = ""
    time: datetime = msgspec.field(default_factory=utcnow)


TRAINER_CONTROL = Key(topology.TRAINER_BUCKET, "state", TrainerControl)

# ---------------------------------------------------------------------------- message failures


class MessageFailures(msgspec.Struct, frozen=True, kw_only=True):
    """How often the handlers of one queued message failed (bucket `failures`), written by the bus.

    Counted here rather than read from JetStream's delivery count, which also counts every
    interruption (a stop, SIGTERM, kill -9, a release to wait its turn): only failures may
    dead-letter a message.
    """

    failures: int = 0
    last_error: str = ""


def message_failures(durable: str, stream_sequence: int) -> Key[MessageFailures]:
    """The failure count of the message at `stream_sequence` as `durable` consumes it."""
    return Key(topology.FAILURES_BUCKET, f"{durable}.{stream_sequence}", MessageFailures)


# ---------------------------------------------------------------------------- curriculum


class LevelChange(msgspec.Struct, kw_only=True, frozen=True):
    """A skill's level rose, on the evidence of one champion score (services/curriculum/progression.py)."""

    time: datetime
    previous_level: int
    level: int
    accuracy: float
    reason: str
    # The champion score that decided: "<checkpoint sha256>:<suite version>".
    eval_key: str
    event_id: str
    # The champion (empty in changes recorded before levels were judged by the champion) and its
    # selection-suite score at the level it passed, with the interval.
    checkpoint_sha256: str = ""
    run_id: str = ""
    suite_version: str = ""
    score: LevelScore | None = None
    # False until `curriculum.level_changed` is published (changes stored before this field
    # existed were announced when they were made).
    announced: bool = True


class SkillState(msgspec.Struct, kw_only=True, frozen=True):
    """One skill's progress (bucket `curriculum`, key: the skill name), written by the curriculum."""

    skill: str
    level: int = 1
    # The champion's accuracy at the current level in its latest scores, oldest first, at most `window` long.
    recent: list[float] = []
    # The champion scores counted ("<checkpoint sha256>:<suite version>"), newest last: each counts
    # once. (Records from before the champion judged levels held every evaluation in `seen`,
    # which is ignored now.)
    champion_scores: list[str] = []
    changes: list[LevelChange] = []
    # Synthetic datasets written so far: numbers each dataset and seeds its generator.
    datasets_submitted: int = 0
    last_submitted_at: datetime | None = None


def skill_state(skill: str) -> Key[SkillState]:
    return Key(topology.CURRICULUM_BUCKET, skill, SkillState)

# ---------------------------------------------------------------------------- trainer state and lease
# Per base model (`model`: the first 16 hex digits of the base model's directory hash, so two
# trainers of the same weights share them wherever the files lie), in bucket `trainer-models`:
#   model.<model>.state               the trainer's state (TrainerState), written by the lease holder
#   model.<model>.lease               who trains this model now (TrainerLease)
#   model.<model>.finished.<dataset>  a trained dataset moved out of the state record (FinishedDataset)


class TrainedDataset(msgspec.Struct, frozen=True):
    dataset_id: str
    uri: str
    # How its rows are read when replayed; states from before schemas were recorded held
    # chat_sft_v1 datasets only.
    schema: str = "chat_sft_v1"
    # Its row transform (libs.common.profiles), applied again when its rows are replayed.
    profile: str = "none"


class PendingRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run that began and has not ended: its dataset's redelivery resumes it before any other trains."""

    dataset_id: str
    run_id: str
    init_weights: str
    # Where its dataset's message waits: the durable consumer that delivered it and the stream
    # sequence. A message the stream no longer holds, or the consumer settled, never comes back:
    # the pending run is then given up rather than waited for forever.
    consumer: str = ""
    stream_sequence: int = 0


class TrainerState(msgspec.Struct, kw_only=True):
    """The trainer's state for one base model (services/trainer/state.py decides its changes)."""

    # URI of the latest finished checkpoint; empty: the base model (nothing trained yet).
    current_weights: str = ""
    current_weights_sha256: str = ""
    global_step: int = 0
    # dataset_id -> URI of the final checkpoint of its run: the idempotency record (the newest
    # ones; older ones are moved to keys of their own, `trainer_finished`).
    finished: dict[str, str] = {}
    # The datasets trained, in order (the newest ones): what replay draws earlier rows from.
    trained: list[TrainedDataset] = []
    # The run begun and not yet ended, if any.
    pending: PendingRun | None = None
    # The trainer that took the lease last: its takeover rewrote this record, so a writer that
    # still holds an older revision fails its compare-and-set instead of overwriting.
    holder: str = ""


class FinishedDataset(msgspec.Struct, frozen=True, kw_only=True):
    """A trained dataset's final checkpoint, once it no longer fits in the state record."""

    checkpoint_uri: str


class TrainerLease(msgspec.Struct, frozen=True, kw_only=True):
    """Which trainer process trains a base model now; renewed every few seconds by its holder.

    Whoever waits for it judges expiry by its own clock: a lease whose revision has not changed
    for `duration_s` seconds (as the waiter measured) has expired; no two hosts' clocks are
    compared. `released`: the holder let go (stopped cleanly); take it at once.
    """

    holder: str
    host: str = ""
    pid: int = 0
    duration_s: float
    acquired_at: datetime
    renewed_at: datetime
    released: bool = False


def trainer_state(model: str) -> Key[TrainerState]:
    return Key(topology.TRAINER_MODELS_BUCKET, f"model.{model}.state", TrainerState)


def trainer_lease(model: str) -> Key[TrainerLease]:
    return Key(topology.TRAINER_MODELS_BUCKET, f"model.{model}.lease", TrainerLease)


def trainer_finished(model: str, dataset_id: str) -> Key[FinishedDataset]:
    return Key(topology.TRAINER_MODELS_BUCKET, f"model.{model}.finished.{dataset_id}", FinishedDataset)
