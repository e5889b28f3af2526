"""The schema registry, deny by default: the row formats the gatekeeper accepts, versioned.

- chat_sft_v1    chat conversations (chat_sft.py); the default when a submission names none
- syllo_v1       SYLLO word puzzles: chat rows plus the puzzle (syllo.py)
- completion_v1  plain `{"text": ...}` rows (completion.py)

A submission names its schema; a name not listed here rejects it with the list of known ones.
A new format, or a new version of one, is a new module with a new name listed here: a schema
never changes under its name. `describe_schemas` feeds `GET /specs`, and `json_schemas` the
AsyncAPI document (`flywheel asyncapi`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from services.gatekeeper.chat_sft import ChatSftV1, Findings, Problems
from services.gatekeeper.checks import Check
from services.gatekeeper.completion import CompletionV1
from services.gatekeeper.syllo import SylloV1

DEFAULT_SCHEMA = "chat_sft_v1"


class RowSchema(Protocol):
    name: str
    # "chat": rendered with the chat template; "text": tokenized as is.
    kind: Literal["chat", "text"]
    description: str
    row_type: type
    profiles: tuple[str, ...]  # answer profiles its rows may have (deep: answer_format)
    checks: tuple[Check, ...]  # its quick row checks

    decoder: msgspec.json.Decoder  # strict: decodes a row of the schema or raises
    def from_object(self, value: dict, found: Findings): ...
    def row_problems(self, rows: Sequence) -> Problems: ...
    def conversation(self, row): ...
    def text(self, row) -> str: ...
    def prompt_and_answer(self, row) -> tuple[str, str] | None: ...
    def profile(self, row) -> str | None: ...
    def encode(self, row) -> bytes: ...
    def encode_lines(self, rows: Sequence) -> bytes: ...


SCHEMAS: dict[str, RowSchema] = {schema.name: schema for schema in (ChatSftV1(), SylloV1(), CompletionV1())}


class UnknownSchema(LookupError):
    pass


def lookup(name: str) -> RowSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UnknownSchema(f"unknown schema {shown!r}; known: {', '.join(SCHEMAS)}") from None


def json_schemas() -> dict[str, dict]:
    """Each schema's row as JSON Schema (one line of a dataset), with its description."""
    kinds = [schema.row_type for schema in SCHEMAS.values()]
    refs, components = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    out = {}
    for schema, ref in zip(SCHEMAS.values(), refs):
        row = dict(components.pop(ref["$ref"].rsplit("/", 1)[1]))
        row["description"] = (f"One line of a {schema.name} dataset (JSON lines): {schema.description}. "
                              "Other fields are dropped, with a warning in the report.")
        # The strict decoder refuses unknown fields only to send the row down the path that
        # reports and drops them; a row with them is still accepted.
        row["additionalProperties"] = True
        out[schema.name] = row
    if "Message" in components:
        components["Message"] = {**components["Message"], "additionalProperties": True}
    return {**out, **components}
