"""The event contract: every fact published on the bus, as msgspec structs.

Each event is JSON with a `type` tag (its class name, a past-tense fact), a unique `id`, the
producing `source` service, a UTC `time` and a `schema_version`. Commands (request/reply)
are imperatives. Large things never ride in events: datasets and checkpoints travel as a URI
plus sha256. `docs/asyncapi.yaml` is generated from this module (`flywheel asyncapi`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import ClassVar, Literal

import msgspec

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
ValidationLevel = Literal["quick", "standard", "deep"]


def new_id() -> str:
    return uuid.uuid4().hex


def derived_id(producer: str, *key: object) -> str:
    """The id of the event that states one fact: the same every time it is derived.

    An event republished after a crash or a redelivery then carries the same id, and
    JetStream's duplicate window (Nats-Msg-Id) drops it. `producer` scopes the key, so two
    services can never derive the same id: uuid5(uuid5(URL, "flywheel/<producer>"), "k1:k2").
    """
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"flywheel/{producer}")
    return uuid.uuid5(namespace, ":".join(map(str, key))).hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type", tag=True):
    """Fields every event carries."""

    id: str = msgspec.field(default_factory=new_id)
    time: datetime = msgspec.field(default_factory=utcnow)
    source: str = ""
    schema_version: int = 1

    # The artifacts the event names, as (URI field, sha256 field): the bus makes them readable
    # from every host before the event goes out (libs.common.artifacts `share`).
    artifact_fields: ClassVar[tuple[tuple[str, str], ...]] = ()

    def artifacts(self) -> list[tuple[str, str]]:
        """(uri, sha256) of every artifact the event names."""
        return [(uri, sha) for uri, sha in ((getattr(self, u), getattr(self, s)) for u, s in self.artifact_fields)
                if uri and sha]


# ---------------------------------------------------------------------------- datasets


class DatasetSubmitted(Event, frozen=True):
    """Someone asks for a dataset to be validated and trained on.

    Small datasets ride inline in `rows` (each row one JSON object of the named schema);
    larger ones are an artifact `uri` (file:// inside Flywheel's data directory, or
    nats-obj://artifacts/<key> in the object store when hosts share no disk) with its sha256.
    Exactly one of the two must be given.
    """

    artifact_fields: ClassVar[tuple[tuple[str, str], ...]] = (("uri", "sha256"),)

    name: str
    schema: str = "chat_sft_v1"
    priority: Priority = "normal"
    level: ValidationLevel = "standard"
    rows: list[dict] | None = None
    uri: str | None = None
    sha256: str | None = None
    submitted_by: str = "anonymous"
    # Where it came in: nats, http, inbox, curriculum, hard-examples (the evaluator: problems a checkpoint failed).
    channel: str = "nats"
    # The data profile the trainer applies to the rows (libs.common.profiles: none, emoji_think,
    # regime3); chat schemas only. The gatekeeper rejects an unknown name.
    profile: str = "none"


class DatasetAccepted(Event, frozen=True):
    """A dataset passed validation; its normalised rows are stored at `uri`."""

    artifact_fields: ClassVar[tuple[tuple[str, str], ...]] = (("uri", "sha256"),)

    dataset_id: str  # sha256 of the normalised content: the idempotency key
    name: str
    uri: str
    sha256: str
    schema: str
    priority: Priority
    num_rows: int
    num_rows_dropped: int
    report_uri: str
    submission_id: str
    # How it came in (as DatasetSubmitted.channel) and who sent it: an inbox file or an HTTP
    # upload has no `dataset.submitted` event, so the verdict is where this is recorded.
    channel: str = ""
    submitted_by: str = ""
    # The data profile the submission named (checked): the trainer applies it to these rows.
    profile: str = "none"


class DatasetRejected(Event, frozen=True):
    """A dataset failed validation. The original bytes and the report are kept."""

    name: str
    reasons: list[str]
    report_uri: str
    submission_id: str
    dataset_id: str = ""
    num_errors: int = 0
    channel: str = ""
    submitted_by: str = ""


# ---------------------------------------------------------------------------- training


class TrainingStarted(Event, frozen=True):
    run_id: str
    dataset_id: str
    init_weights: str
    total_steps: int
    start_step: int  # > 0 when resuming after a crash or a stop
    global_step: int
    # The run's examples per epoch (the dataset's trainable rows plus the replayed ones), and the
    # dataset's rows the trainer dropped (template or tokenization failed, or no trained token,
    # e.g. every answer cut away by max_length), with one line per reason: "2 rows (3, 7): why".
    num_examples: int = 0
    num_replayed: int = 0
    num_rows_dropped: int = 0
    dropped_reasons: list[str] = []


class TrainingProgress(Event, frozen=True):
    run_id: str
    dataset_id: str
    step: int
    total_steps: int
    global_step: int
    loss: float  # the mean step loss since the previous progress event
    learning_rate: float
    tokens_per_second: float  # real (non-padding) tokens trained per second since the previous event
    epoch: float = 0.0  # epochs done, fractional (1.5: halfway through the second)
    grad_norm: float | None = None  # mean gradient norm (before clipping) since the previous event
    # Token-mean loss on the dataset's held-out slice (never trained on), at the latest
    # validation; None when the dataset is too small to hold rows out.
    val_loss: float | None = None
    train_val_gap: float | None = None  # val_loss - loss: < 0.3 generalising, > 0.5 overfitting
    eta_s: float | None = None  # seconds to the run's last step at the recent pace


class TrainingFinished(Event, frozen=True):
    run_id: str
    dataset_id: str
    global_step: int
    final_loss: float
    checkpoint_uri: str
    duration_s: float
    # Real (non-padding) tokens the run trained, counted as training.progress counts its tokens/s:
    # budgets compare in tokens across machines that differ 3x in speed.
    tokens: int = 0


class TrainingFailed(Event, frozen=True):
    run_id: str
    dataset_id: str
    error: str
    will_retry: bool


class CheckpointSaved(Event, frozen=True):
    """Weights and tokenizer in HF format at `uri`; (run_id, step) is its key."""

    artifact_fields: ClassVar[tuple[tuple[str, str], ...]] = (("uri", "sha256"),)

    run_id: str
    step: int
    global_step: int
    dataset_id: str
    uri: str
    sha256: str
    final: bool
    # The profile of the dataset the run trained (libs.common.profiles): its generation-time
    # rules apply when this checkpoint is scored and served.
    profile: str = "none"


class TrainingPaused(Event, frozen=True):
    """The trainer paused itself: the free space under its artifacts fell below the floor.

    The run in progress (if any) stopped at a step boundary and its dataset was released, to
    resume from its last checkpoint; the trainer takes work again by itself once `floor_bytes`
    (plus a margin) are free. An operator's pause is a mode, not this event.
    """

    reason: str
    free_bytes: int
    floor_bytes: int
    run_id: str = ""
    dataset_id: str = ""
    step: int | None = None


# ---------------------------------------------------------------------------- evaluation


class LevelScore(msgspec.Struct, kw_only=True, frozen=True):
    """One level's score on the suite ("<skill>/<level>"): accuracy with its 95% Wilson interval."""

    correct: int
    total: int
    accuracy: float
    # The 95% Wilson score interval of the accuracy: a score is a sample.
    low: float
    high: float
    # Mean cross-entropy over this level's gold answer tokens; None: not finite.
    val_loss: float | None = None


class Confirmation(msgspec.Struct, frozen=True):
    """A candidate and the champion on the confirmation suite (libs.common.paired): the items at
    `levels` (where the screen saw the candidate ahead), in suite order, read as
    `EvalScored.outcomes`. Scored only for a candidate past the screen."""

    suite_version: str
    champion_sha256: str  # the champion it was scored against
    levels: list[str]
    num_examples: int
    outcomes: str
    champion_outcomes: str

    def item_outcomes(self) -> tuple[list[bool], list[bool]]:
        """The candidate's and the champion's results; ValueError when either does not hold num_examples."""
        return (decode_outcomes(self.outcomes, self.num_examples),
                decode_outcomes(self.champion_outcomes, self.num_examples))


class EvalScored(Event, frozen=True):
    """A checkpoint's scores on one suite; (checkpoint sha256, suite version) is its key.

    JSON has no NaN: a float that can come out non-finite (a diverged model's loss) is null
    (None) then, never a number. `outcomes` holds every item's result in suite order (the suite
    version fixes the items and their order), so two scores on one suite compare item by item:
    lowercase hex, item i is bit `0x80 >> (i % 8)` of byte `i // 8` (1 = correct), unused
    bits of the last byte 0 (`encode_outcomes`, `EvalScored.item_outcomes`).
    """

    # The base model's first score names the copy the evaluator registered.
    artifact_fields: ClassVar[tuple[tuple[str, str], ...]] = (("checkpoint_uri", "checkpoint_sha256"),)

    run_id: str
    step: int
    checkpoint_uri: str
    checkpoint_sha256: str
    suite: str
    suite_version: str
    exact_match: float
    # Mean cross-entropy over the gold answer tokens; None: not finite.
    val_loss: float | None
    num_examples: int
    # Per skill level accuracy, e.g. {"binary/1": 0.5}; drives the curriculum.
    by_level: dict[str, float] = {}
    # The 95% Wilson score interval of exact_match.
    exact_match_low: float = 0.0
    exact_match_high: float = 1.0
    levels: dict[str, LevelScore] = {}
    outcomes: str = ""
    # Expected calibration error over 6 equal-width bins of the answer's confidence (the geometric
    # mean of the probabilities of the greedily generated tokens); None: not finite.
    ece: float | None = None
    # What got worse than the champion (`compared_with`, scored on this suite), one reason each
    # (`score_regressions` with its default thresholds); empty also when there was nothing to compare.
    regressions: list[str] = []
    compared_with: str = ""
    # The confirmation against the champion (`compared_with`) when the candidate passed the
    # screen there; None otherwise (the deployer then keeps the champion without spending alpha).
    confirmation: Confirmation | None = None

    def item_outcomes(self) -> list[bool]:
        """Each item's result in suite order; ValueError when `outcomes` does not hold num_examples."""
        return decode_outcomes(self.outcomes, self.num_examples)


class ChampionTested(Event, frozen=True):
    """A champion's score on the sealed test suite; (checkpoint sha256, test suite version) is its key.

    Three sets, three roles: training data teaches, the selection suite (`EvalScored`) decides
    promotions and level changes, and the sealed test only reports. Every number shown for a
    champion comes from here; no service decides anything on it (the deployer and the
    curriculum never read `eval.tested`). The test suite holds fresh eval-split problems at the
    selection suite's levels, none of them a selection item, so a champion's numbers are not
    the best of many candidates on the same items. `levels`, the interval and `outcomes` read as
    in `EvalScored` (item order: the test suite's), so consecutive champions compare item by
    item; `eval_id` is the champion's selection score it belongs to (`Champion.eval_id`, "" when
    its record held none) on `selection_suite_version`.
    """

    run_id: str
    step: int
    checkpoint_uri: str
    checkpoint_sha256: str
    suite: str
    suite_version: str
    exact_match: float
    # The 95% Wilson score interval of exact_match.
    exact_match_low: float
    exact_match_high: float
    num_examples: int
    # Mean cross-entropy over the gold answer tokens; None: not finite.
    val_loss: float | None
    levels: dict[str, LevelScore]
    outcomes: str
    eval_id: str
    selection_suite_version: str
    ece: float | None = None

    def item_outcomes(self) -> list[bool]:
        """Each item's result in test suite order; ValueError when `outcomes` does not hold num_examples."""
        return decode_outcomes(self.outcomes, self.num_examples)


def encode_outcomes(correct: Sequence[bool]) -> str:
    """Per-item results as `EvalScored.outcomes`: hex, item i is bit 0x80 >> (i % 8) of byte i // 8."""
    packed = bytearray((len(correct) + 7) // 8)
    for i, ok in enumerate(correct):
        if ok:
            packed[i // 8] |= 0x80 >> (i % 8)
    return packed.hex()


def decode_outcomes(text: str, count: int) -> list[bool]:
    """The `count` results `encode_outcomes` wrote; ValueError when `text` does not hold exactly that."""
    try:
        packed = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"outcomes are not hex: {exc}") from exc
    if len(packed) != (count + 7) // 8 or (count % 8 and packed[-1] & (0xFF >> (count % 8))):
        raise ValueError(f"outcomes hold {len(packed) * 8} bits, not {count} results")
    return [bool(packed[i // 8] & (0x80 >> (i % 8))) for i in range(count)]


# A float difference this small is a tie (0.8 - 0.75 is 0.05000000000000004).
_TIE = 1e-9


def score_regressions(
    levels: Mapping[str, LevelScore], val_loss: float | None,
    baseline_levels: Mapping[str, LevelScore], baseline_val_loss: float | None,
    *, max_level_drop: float = 0.05, max_loss_rise: float = 0.15,
) -> list[str]:
    """What got worse than a baseline scored on the same suite, one reason each.

    A regression: a level's accuracy down by more than `max_level_drop` (absolute, 0.05 = 5
    points), or the val loss up by more than `max_loss_rise` (relative, 0.15 = 15%) or not
    finite. A skill's accuracy over its levels is their item-weighted mean, so it cannot drop
    further than its worst level: checking the levels covers the skills. Levels only one side
    has are not compared. The evaluator flags with the defaults; the deployer refuses with its
    settings.
    """
    found = []
    for key in sorted(levels.keys() & baseline_levels.keys()):
        new, old = levels[key].accuracy, baseline_levels[key].accuracy
        if old - new > max_level_drop + _TIE:
            found.append(f"{key} accuracy {new:.3f} vs {old:.3f}: down {(old - new) * 100:.1f} points "
                         f"(more than {max_level_drop * 100:g})")
    if val_loss is None:
        found.append("val loss is not finite")
    elif baseline_val_loss is not None and val_loss > baseline_val_loss * (1 + max_loss_rise) + _TIE:
        rise = (val_loss / baseline_val_loss - 1) if baseline_val_loss > 0 else float("inf")
        found.append(f"val loss {val_loss:.4f} vs {baseline_val_loss:.4f}: up {rise:.1%} "
                     f"(more than {max_loss_rise:.0%})")
    return found


# ---------------------------------------------------------------------------- deployment


class ModelDeployed(Event, frozen=True):
    checkpoint_uri: str
    checkpoint_sha256: str
    run_id: str
    step: int
    exact_match: float
    val_loss: float
    reason: str
    previous_checkpoint_uri: str = ""


class ModelRolledBack(Event, frozen=True):
    checkpoint_uri: str
    checkpoint_sha256: str
    rolled_back_from: str
    reason: str


DeploymentKind = Literal["promotion", "manual", "rollback"]


class ModelStaged(Event, frozen=True):
    """The deployer wants this checkpoint served; nothing is final yet.

    Every inference replica loads it and answers with `model.serving`. The champion changes, and
    `model.deployed` follows, only once a replica reports serving exactly `checkpoint_sha256`;
    otherwise `model.deploy_failed` says why and the champion stays. `kind`: promotion (the rule),
    manual (`flywheel deploy`), rollback.
    """

    deployment_id: str
    kind: DeploymentKind
    checkpoint_uri: str
    checkpoint_sha256: str
    run_id: str
    step: int
    reason: str
    # When the deployer stops waiting for a replica's report.
    deadline: datetime


class ModelServing(Event, frozen=True):
    """An inference replica's answer to `model.staged`.

    ok: the replica now serves `checkpoint_sha256`, as its loaded model reports it (the bytes
    matched that hash and generated a token). Not ok: it could not load the checkpoint
    (`reason`) and still serves `checkpoint_sha256`, its previous model ("" when none).
    """

    deployment_id: str
    # Who answers: "<hostname>-<pid>" unless the replica is given a name.
    replica: str
    ok: bool
    checkpoint_sha256: str
    checkpoint_uri: str = ""
    reason: str = ""


class ModelDeployFailed(Event, frozen=True):
    """A staged deployment will not be served; the champion stays. `reason` says why: a replica
    could not load it, none reported in time, a newer deployment replaced it, or the champion
    changed while it was staged. Replicas that loaded it go back to the champion."""

    deployment_id: str
    kind: DeploymentKind
    checkpoint_uri: str
    checkpoint_sha256: str
    reason: str


# ---------------------------------------------------------------------------- curriculum


class CurriculumLevelChanged(Event, frozen=True):
    """A skill's level rose because the champion's selection-suite accuracy at it reached the bar."""

    skill: str
    previous_level: int
    level: int
    accuracy: float
    reason: str
    # The champion that justified it, and its score at `previous_level` with the 95% interval.
    checkpoint_sha256: str = ""
    run_id: str = ""
    suite_version: str = ""
    score: LevelScore | None = None


# ---------------------------------------------------------------------------- commands


class ControlTraining(msgspec.Struct, kw_only=True, frozen=True):
    """Request on `control.trainer.<action>`; action is pause, resume, stop or skip.

    skip ends the current run and gives its dataset up (never trained); it needs a `reason`,
    which its training.failed carries with `requested_by`.
    """

    action: Literal["pause", "resume", "stop", "skip"]
    requested_by: str = "cli"
    reason: str = ""


class ControlReply(msgspec.Struct, kw_only=True, frozen=True):
    ok: bool
    state: str
    message: str = ""


class DeployCheckpoint(msgspec.Struct, kw_only=True, frozen=True):
    """Request on `control.deployer.deploy`: serve this checkpoint (its sha256 or artifact URI).

    Only a checkpoint scored on the current suite (the newest score's) with a finite val loss
    is deployed; the paired test is the operator's call here, not the deployer's.
    """

    checkpoint: str
    requested_by: str = "cli"


class RollBackDeployment(msgspec.Struct, kw_only=True, frozen=True):
    """Request on `control.deployer.rollback`: serve the previous champion again; the rolled-back
    champion's run is never promoted again."""

    requested_by: str = "cli"


class DeployReply(msgspec.Struct, kw_only=True, frozen=True):
    """The deployer's answer: `state` is staged (the checkpoint goes to inference; the champion
    changes once a replica serves it, `flywheel history` shows the outcome), already_champion,
    rescored (the champion's record took this suite's score), refused or error; `message` says why."""

    ok: bool
    state: str
    message: str = ""
    checkpoint_uri: str = ""
    checkpoint_sha256: str = ""
    # Set when the checkpoint was staged: final once inference serves it (`flywheel history`).
    deployment_id: str = ""


EVENT_TYPES: tuple[type[Event], ...] = (
    DatasetSubmitted,
    DatasetAccepted,
    DatasetRejected,
    TrainingStarted,
    TrainingProgress,
    TrainingFinished,
    TrainingFailed,
    CheckpointSaved,
    EvalScored,
    ChampionTested,
    ModelDeployed,
    ModelRolledBack,
    ModelStaged,
    ModelServing,
    ModelDeployFailed,
    CurriculumLevelChanged,
    TrainingPaused,
)

AnyEvent = (
    DatasetSubmitted
    | DatasetAccepted
    | DatasetRejected
    | TrainingStarted
    | TrainingProgress
    | TrainingFinished
    | TrainingFailed
    | CheckpointSaved
    | EvalScored
    | ChampionTested
    | ModelDeployed
    | ModelRolledBack
    | ModelStaged
    | ModelServing
    | ModelDeployFailed
    | CurriculumLevelChanged
    | TrainingPaused
)

_encoder = msgspec.json.Encoder()


def encode(event: msgspec.Struct) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Decode `data` as `kind`; raises msgspec.DecodeError / ValidationError with a reason."""
    return msgspec.json.decode(data, type=kind)
