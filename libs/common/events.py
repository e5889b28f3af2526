"""The event contract: every fact published on the bus, as msgspec structs.

Each event is JSON with a `type` tag (its class name, a past-tense fact), a unique `id`, the
producing `source` service, a UTC `time` and a `schema_version`. Commands (request/reply)
are imperatives. Large things never ride in events: datasets and checkpoints travel as a URI
plus sha256. `docs/asyncapi.yaml` is generated from this module (`flywheel asyncapi`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

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


# ---------------------------------------------------------------------------- datasets


class DatasetSubmitted(Event, frozen=True):
    """Someone asks for a dataset to be validated and trained on.

    Small datasets ride inline in `rows` (each row one JSON object of the named schema);
    larger ones are an artifact `uri` (file:// inside Flywheel's data directory) with its
    sha256. Exactly one of the two must be given.
    """

    name: str
    schema: str = "chat_sft_v1"
    priority: Priority = "normal"
    level: ValidationLevel = "standard"
    rows: list[dict] | None = None
    uri: str | None = None
    sha256: str | None = None
    submitted_by: str = "anonymous"
    # Where it came in: nats, http, inbox, curriculum.
    channel: str = "nats"


class DatasetAccepted(Event, frozen=True):
    """A dataset passed validation; its normalised rows are stored at `uri`."""

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


class DatasetRejected(Event, frozen=True):
    """A dataset failed validation. The original bytes and the report are kept."""

    name: str
    reasons: list[str]
    report_uri: str
    submission_id: str
    dataset_id: str = ""
    num_errors: int = 0


# ---------------------------------------------------------------------------- training


class TrainingStarted(Event, frozen=True):
    run_id: str
    dataset_id: str
    init_weights: str
    total_steps: int
    start_step: int  # > 0 when resuming after a crash or a stop
    global_step: int


class TrainingProgress(Event, frozen=True):
    run_id: str
    dataset_id: str
    step: int
    total_steps: int
    global_step: int
    loss: float
    learning_rate: float
    tokens_per_second: float


class TrainingFinished(Event, frozen=True):
    run_id: str
    dataset_id: str
    global_step: int
    final_loss: float
    checkpoint_uri: str
    duration_s: float


class TrainingFailed(Event, frozen=True):
    run_id: str
    dataset_id: str
    error: str
    will_retry: bool


class CheckpointSaved(Event, frozen=True):
    """Weights and tokenizer in HF format at `uri`; (run_id, step) is its key."""

    run_id: str
    step: int
    global_step: int
    dataset_id: str
    uri: str
    sha256: str
    final: bool


# ---------------------------------------------------------------------------- evaluation


class EvalScored(Event, frozen=True):
    """A checkpoint's scores on one suite; (checkpoint sha256, suite version) is its key."""

    run_id: str
    step: int
    checkpoint_uri: str
    checkpoint_sha256: str
    suite: str
    suite_version: str
    exact_match: float
    val_loss: float
    num_examples: int
    # Per skill level accuracy, e.g. {"binary/1": 0.5}; drives the curriculum.
    by_level: dict[str, float] = {}


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


# ---------------------------------------------------------------------------- curriculum


class CurriculumLevelChanged(Event, frozen=True):
    skill: str
    previous_level: int
    level: int
    accuracy: float
    reason: str


# ---------------------------------------------------------------------------- commands


class ControlTraining(msgspec.Struct, kw_only=True, frozen=True):
    """Request on `control.trainer.<action>`; action is pause, resume or stop."""

    action: Literal["pause", "resume", "stop"]
    requested_by: str = "cli"


class ControlReply(msgspec.Struct, kw_only=True, frozen=True):
    ok: bool
    state: str
    message: str = ""


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
    ModelDeployed,
    ModelRolledBack,
    CurriculumLevelChanged,
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
    | ModelDeployed
    | ModelRolledBack
    | CurriculumLevelChanged
)

_encoder = msgspec.json.Encoder()


def encode(event: msgspec.Struct) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Decode `data` as `kind`; raises msgspec.DecodeError / ValidationError with a reason."""
    return msgspec.json.decode(data, type=kind)
