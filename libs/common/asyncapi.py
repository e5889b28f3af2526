"""The AsyncAPI 3.0 document of the event contract, generated from the services' declarations.

Channels and operations come from what each service declares (`Service.subscriptions`,
`publications`, `replies`) and what clients declare (the CLI), payloads from the msgspec
schemas, so the document cannot drift from the code. `flywheel asyncapi` writes it to
docs/asyncapi.yaml (a test fails when the file is stale); the gatekeeper serves it. Any client
in any language can publish `dataset.submitted` from it. It also shows the dataset schemas a
submission may name (one JSON Schema per line format); the gatekeeper's schema registry owns
those. The caller passes the declarations and schemas in, so this library imports no service.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import msgspec
import yaml

from libs.common import events, topology
from libs.common.service import Client, Service

ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


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


def channel_id(address: str) -> str:
    """`dataset.accepted.{priority}` -> datasetAccepted, `model.rolled_back` -> modelRolledBack."""
    words = [w for token in address.split(".") if not token.startswith("{") for w in token.split("_")]
    return words[0] + "".join(w.capitalize() for w in words[1:])


class _Channels:
    """Channels, operations and messages collected from the declarations."""

    def __init__(self) -> None:
        self.channels: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.kinds: set[type] = set()

    def channel(self, address: str, *kinds: type) -> dict:
        cid = channel_id(address)
        channel = self.channels.setdefault(cid, {"address": address, "messages": {}})
        if channel["address"] != address:
            raise ValueError(f"channel {cid}: declared as {channel['address']} and as {address}")
        for kind in kinds:
            channel["messages"][kind.__name__] = {"$ref": f"#/components/messages/{kind.__name__}"}
            self.kinds.add(kind)
        if params := {p: topology.SUBJECT_PARAMETERS[p] for p in re.findall(r"{(\w+)}", address)}:
            channel["parameters"] = params
        return {"$ref": f"#/channels/{cid}"}

    def operation(self, who: str, action: str, address: str, kinds: tuple[type, ...], summary: str,
                  reply: type | None = None) -> None:
        ref = self.channel(address, *kinds, *((reply,) if reply else ()))
        operation = {"action": action, "channel": ref, "summary": summary,
                     "messages": [{"$ref": f"{ref['$ref']}/messages/{k.__name__}"} for k in kinds]}
        if reply:
            operation["reply"] = {"channel": ref, "messages": [{"$ref": f"{ref['$ref']}/messages/{reply.__name__}"}]}
        self.operations[f"{_slug(who)}.{action}.{channel_id(address)}"] = operation


def build_asyncapi(services: Sequence[Service], clients: Sequence[Client], dataset_schemas: dict[str, dict]) -> dict:
    """The document, from what each service and client declares.

    `dataset_schemas` maps a row-format name (chat_sft_v1, ...) to its JSON Schema.
    """
    found = _Channels()
    for service in services:
        for pub in service.publications:
            found.operation(service.name, "send", pub.subject, (pub.event_type,),
                            pub.summary or f"{service.name} publishes")
        for sub in service.subscriptions:
            found.operation(service.name, "receive", sub.subject, (sub.event_type,),
                            sub.summary or f"{service.name} consumes: {sub.delivery}")
        for reply in service.replies:
            found.operation(service.name, "receive", reply.subject, (reply.request_type,),
                            reply.summary or f"{service.name} answers (core NATS request/reply, not stored)",
                            reply=reply.reply_type)
    for client in clients:
        for pub in client.publications:
            found.operation(client.name, "send", pub.subject, (pub.event_type,), pub.summary or f"{client.name} publishes")
        for request in client.requests:
            found.operation(client.name, "send", request.subject, (request.request_type,),
                            request.summary or f"{client.name} requests", reply=request.reply_type)
    kinds = sorted(found.kinds, key=lambda k: k.__name__)
    _, schemas = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    if clash := set(dataset_schemas) & set(schemas):
        raise ValueError(f"dataset schema names clash with event schemas: {sorted(clash)}")
    schemas.update(dataset_schemas)
    messages = {}
    for kind in kinds:
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
                "checkpoints travel as a URI plus sha256, never inline (except small inline `rows`). "
                "Generated from each service's declared subscriptions and publications (services/*/service.py)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "the embedded default"}},
        "channels": dict(sorted(found.channels.items())),
        "operations": dict(sorted(found.operations.items())),
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def _slug(who: str) -> str:
    return who.replace(" ", "-")


def render_asyncapi(services: Sequence[Service], clients: Sequence[Client], dataset_schemas: dict[str, dict]) -> str:
    header = "# Generated from the services' declarations by `flywheel asyncapi`. Do not edit by hand.\n"
    document = build_asyncapi(services, clients, dataset_schemas)
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
