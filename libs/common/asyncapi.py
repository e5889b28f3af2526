"""The AsyncAPI 3.0 document of the event contract, generated from the msgspec schemas.

`flywheel asyncapi` writes it to docs/asyncapi.yaml (a test fails when the file is stale);
the gatekeeper serves it. Any client in any language can publish `dataset.submitted` from it.
It also shows the dataset schemas a submission may name (one JSON Schema per line format);
the gatekeeper's schema registry owns those and the caller passes them in, so the contract
library never imports a service.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import msgspec
import yaml

from libs.common import events, topology

ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


# (channel id, address, message types, parameters, publishers, subscribers)
CHANNELS: tuple[tuple[str, str, tuple[type, ...], dict, tuple[str, ...], tuple[str, ...]], ...] = (
    ("datasetSubmitted", topology.DATASET_SUBMITTED, (events.DatasetSubmitted,), {},
     ("any client", "curriculum", "flywheel submit"), ("gatekeeper",)),
    ("datasetAccepted", "dataset.accepted.{priority}", (events.DatasetAccepted,),
     {"priority": {"enum": list(events.PRIORITIES), "description": "the trainer drains high before normal before low"}},
     ("gatekeeper",), ("trainer",)),
    ("datasetRejected", topology.DATASET_REJECTED, (events.DatasetRejected,), {}, ("gatekeeper",), ()),
    ("trainingStarted", topology.TRAINING_STARTED, (events.TrainingStarted,), {}, ("trainer",), ()),
    ("trainingProgress", topology.TRAINING_PROGRESS, (events.TrainingProgress,), {}, ("trainer",), ()),
    ("trainingFinished", topology.TRAINING_FINISHED, (events.TrainingFinished,), {}, ("trainer",), ()),
    ("trainingFailed", topology.TRAINING_FAILED, (events.TrainingFailed,), {}, ("trainer",), ()),
    ("checkpointSaved", topology.CHECKPOINT_SAVED, (events.CheckpointSaved,), {}, ("trainer",), ("evaluator",)),
    ("evalScored", topology.EVAL_SCORED, (events.EvalScored,), {}, ("evaluator",), ("deployer", "curriculum")),
    ("modelDeployed", topology.MODEL_DEPLOYED, (events.ModelDeployed,), {}, ("deployer",), ("inference",)),
    ("modelRolledBack", topology.MODEL_ROLLED_BACK, (events.ModelRolledBack,), {}, ("deployer",), ()),
    ("curriculumLevelChanged", topology.CURRICULUM_LEVEL_CHANGED, (events.CurriculumLevelChanged,), {},
     ("curriculum",), ()),
    ("trainerControl", f"{topology.CONTROL_TRAINER}.{{action}}", (events.ControlTraining, events.ControlReply),
     {"action": {"enum": ["pause", "resume", "stop"], "description": "core NATS request/reply, not stored"}},
     ("flywheel CLI", "any client"), ("trainer",)),
)

CLOUDEVENT_HEADERS = {
    "type": "object",
    "description": "NATS headers on every event. Nats-Msg-Id makes JetStream drop a republished event.",
    "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "= the event id"},
        "ce-specversion": {"type": "string", "const": "1.0"},
        "ce-id": {"type": "string", "description": "= the event id"},
        "ce-type": {"type": "string", "description": "the event type, e.g. DatasetAccepted"},
        "ce-source": {"type": "string", "description": "flywheel/<service>"},
        "ce-time": {"type": "string", "format": "date-time"},
        "traceparent": {"type": "string", "description": "W3C trace context linking the dataset's journey"},
    },
    "required": ["Nats-Msg-Id", "ce-id", "ce-type", "ce-source", "ce-time"],
}


def _doc(kind: type) -> str:
    return inspect.cleandoc(kind.__doc__ or kind.__name__)


def build_asyncapi(dataset_schemas: dict[str, dict]) -> dict:
    """The document; `dataset_schemas` maps a row-format name (chat_sft_v1, ...) to its JSON Schema."""
    kinds = sorted({k for _, _, ks, *_ in CHANNELS for k in ks}, key=lambda k: k.__name__)
    _, schemas = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    datasets = dataset_schemas
    if clash := set(datasets) & set(schemas):
        raise ValueError(f"dataset schema names clash with event schemas: {sorted(clash)}")
    schemas.update(datasets)
    channels, operations, messages = {}, {}, {}
    for channel_id, address, kinds_here, params, publishers, subscribers in CHANNELS:
        channels[channel_id] = {
            "address": address,
            "messages": {k.__name__: {"$ref": f"#/components/messages/{k.__name__}"} for k in kinds_here},
            **({"parameters": params} if params else {}),
        }
        ref = {"$ref": f"#/channels/{channel_id}"}
        for who in publishers:
            operations[f"{_slug(who)}.send.{channel_id}"] = {"action": "send", "channel": ref, "summary": f"{who} publishes"}
        for who in subscribers:
            operations[f"{_slug(who)}.receive.{channel_id}"] = {"action": "receive", "channel": ref, "summary": f"{who} consumes"}
        for kind in kinds_here:
            messages[kind.__name__] = {
                "name": kind.__name__,
                "title": kind.__name__,
                "summary": _doc(kind).splitlines()[0],
                "description": _doc(kind),
                "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{kind.__name__}"},
                **({"headers": {"$ref": "#/components/schemas/CloudEventHeaders"}} if issubclass(kind, events.Event) else {}),
            }
    schemas["CloudEventHeaders"] = CLOUDEVENT_HEADERS
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Flywheel events",
            "version": "1",
            "description": (
                "Facts published on NATS JetStream by Flywheel's services. Payloads are JSON with a `type` tag, "
                "a unique `id`, the producing `source`, a UTC `time` and a `schema_version`. Datasets and "
                "checkpoints travel as a URI plus sha256, never inline (except small inline `rows`)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "the embedded default"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def _slug(who: str) -> str:
    return who.replace(" ", "-")


def render_asyncapi(dataset_schemas: dict[str, dict]) -> str:
    header = "# Generated from libs/common/events.py by `flywheel asyncapi`. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_asyncapi(dataset_schemas), sort_keys=False, allow_unicode=True, width=100)
