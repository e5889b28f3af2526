"""Subjects, streams, durable consumers and KV buckets: the one place that names them.

Every stream and consumer is created idempotently by `Bus.ensure_topology()`, so any service
can start first. Scaling out = more processes bound to the same durable consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.common.events import PRIORITIES, Priority

# ---------------------------------------------------------------------------- subjects
DATASET_SUBMITTED = "dataset.submitted"
DATASET_REJECTED = "dataset.rejected"
TRAINING_STARTED = "training.started"
TRAINING_PROGRESS = "training.progress"
TRAINING_FINISHED = "training.finished"
TRAINING_FAILED = "training.failed"
CHECKPOINT_SAVED = "checkpoint.saved"
EVAL_SCORED = "eval.scored"
# A champion's score on the sealed test suite (stored in EVALS): it reports, and no durable
# consumer takes it, so no service decides on it; read models replay it.
EVAL_TESTED = "eval.tested"
MODEL_DEPLOYED = "model.deployed"
MODEL_ROLLED_BACK = "model.rolled_back"
# A deployment is staged, inference answers whether it serves it, a failed one says why
# (stored in MODELS with model.deployed).
MODEL_STAGED = "model.staged"
MODEL_SERVING = "model.serving"
MODEL_DEPLOY_FAILED = "model.deploy_failed"
CURRICULUM_LEVEL_CHANGED = "curriculum.level_changed"
DEAD_LETTER_PREFIX = "deadletter"
# Core NATS request/reply (not stored): control.trainer.pause|resume|stop|skip
CONTROL_TRAINER = "control.trainer"
DATASET_ACCEPTED = "dataset.accepted.{priority}"
CONTROL_TRAINER_ACTION = f"{CONTROL_TRAINER}.{{action}}"
# Core NATS request/reply (not stored), answered by the deployer: a manual deploy, a rollback.
CONTROL_DEPLOYER = "control.deployer"
CONTROL_DEPLOYER_DEPLOY = f"{CONTROL_DEPLOYER}.deploy"
CONTROL_DEPLOYER_ROLLBACK = f"{CONTROL_DEPLOYER}.rollback"
# The trainer stopped taking work by itself (the disk under its artifacts is below the floor).
TRAINING_PAUSED = "training.paused"

# What a `{parameter}` in a subject stands for (documented in the AsyncAPI document).
SUBJECT_PARAMETERS = {
    "priority": {"enum": list(PRIORITIES), "description": "the trainer drains high before normal before low"},
    "action": {"enum": ["pause", "resume", "stop", "skip"], "description": "core NATS request/reply, not stored"},
}


def dataset_accepted(priority: Priority) -> str:
    return DATASET_ACCEPTED.format(priority=priority)


def dead_letter(subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{subject}"


# ---------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    # Streams are the history the read model is rebuilt from: keep it, within bounds.
    max_age_s: float = 30 * 24 * 3600
    max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("DATASETS", ("dataset.>",)),
    StreamSpec("TRAINING", ("training.>", "checkpoint.>")),
    StreamSpec("EVALS", ("eval.>",)),
    StreamSpec("MODELS", ("model.>",)),
    StreamSpec("CURRICULUM", ("curriculum.>",)),
    StreamSpec("DEADLETTER", (f"{DEAD_LETTER_PREFIX}.>",)),
)


def stream_for(subject: str) -> str:
    """The stream that stores `subject` (the first token decides)."""
    head = subject.split(".", 1)[0]
    for stream in STREAMS:
        if any(s.split(".", 1)[0] == head for s in stream.subjects):
            return stream.name
    raise KeyError(f"no stream stores {subject!r}")


# ---------------------------------------------------------------------------- consumers


@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    stream: str
    filter_subject: str
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    # Redelivery delays after a failure (nak with delay), last one repeats.
    backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)
    # Long handlers keep their message as a lease with in_progress() heartbeats.
    long_running: bool = False
    max_ack_pending: int = 1000


GATEKEEPER = ConsumerSpec("gatekeeper", "DATASETS", DATASET_SUBMITTED, ack_wait_s=120.0, long_running=True)
# One durable per priority: the trainer drains high before normal before low.
TRAINER = tuple(
    ConsumerSpec(
        f"trainer-{p}", "DATASETS", dataset_accepted(p),
        ack_wait_s=60.0, long_running=True, max_deliver=5, max_ack_pending=1,
    )
    for p in PRIORITIES
)
EVALUATOR = ConsumerSpec("evaluator", "TRAINING", CHECKPOINT_SAVED, ack_wait_s=60.0, long_running=True)
DEPLOYER = ConsumerSpec("deployer", "EVALS", EVAL_SCORED, ack_wait_s=120.0, long_running=True)
# The curriculum judges levels by the champion: every announced champion change. (Not the
# durable "curriculum" on EVALS, which took every evaluation before: an upgraded server keeps that
# one, undrained and harmless, until an operator deletes it.)
CURRICULUM = ConsumerSpec("curriculum-champion", "MODELS", MODEL_DEPLOYED)
# Inference replicas' reports on staged deployments: whichever deployer replica takes one decides.
DEPLOYER_SERVING = ConsumerSpec("deployer-serving", "MODELS", MODEL_SERVING)

CONSUMERS: tuple[ConsumerSpec, ...] = (GATEKEEPER, *TRAINER, EVALUATOR, DEPLOYER, CURRICULUM, DEPLOYER_SERVING)
# The queue: datasets waiting for validation or for training, at any priority.
QUEUE: tuple[ConsumerSpec, ...] = (GATEKEEPER, *TRAINER)

# ---------------------------------------------------------------------------- KV buckets


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int = 64
    description: str = field(default="")
    # Entries older than this are dropped (None: kept until overwritten or deleted).
    max_age_s: float | None = None


CHAMPION_BUCKET = BucketSpec(
    "champion", history=64, description="the served checkpoint (key: current) and the deployer's decisions (key: decisions)",
)
CURRICULUM_BUCKET = BucketSpec("curriculum", history=16, description="level per skill")
TRAINER_BUCKET = BucketSpec("trainer", history=8, description="trainer control state (key: state)")
# Written by the bus alone: how often each queued message's handler failed, so only failures
# count toward max_deliver (interruptions and crashes do not). A key lives while its message
# is unsettled; the age limit (the streams') only bounds what a lost message leaves behind.
FAILURES_BUCKET = BucketSpec(
    "failures", history=1, max_age_s=30 * 24 * 3600,
    description="handler failures per queued message (key: <durable>.<stream sequence>)",
)
# Written by the trainer holding a base model's lease (services/trainer/state.py, lease.py); the
# lease is renewed every few seconds, so it is kept apart from the records the dashboard watches.
TRAINER_MODELS_BUCKET = BucketSpec(
    "trainer-models", history=8,
    description="per base model: trainer state, lease, finished datasets (keys: model.<id>.state|lease|finished.<dataset>)",
)
BUCKETS: tuple[BucketSpec, ...] = (CHAMPION_BUCKET, CURRICULUM_BUCKET, TRAINER_BUCKET, FAILURES_BUCKET, TRAINER_MODELS_BUCKET)
