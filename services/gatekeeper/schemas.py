"""The schema registry: which row formats the gatekeeper accepts, and what a schema must provide.

A submission names its schema (default `chat_sft_v1`); an unknown name rejects it with the
list of known ones. To add a format, implement `RowSchema` in its own module and list it here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from libs.common.events import ValidationLevel
from services.gatekeeper.chat_sft import ChatSftV1, Findings, RowRule, TokenBudget
from services.gatekeeper.checks import LEVELS, SHARED_CHECKS, Check

DEFAULT_SCHEMA = "chat_sft_v1"


class RowSchema(Protocol):
    name: str
    description: str
    checks: tuple[Check, ...]

    def decode(self, line: bytes) -> Any | None: ...

    def from_object(self, value: dict, found: Findings) -> Any | None: ...

    def rules(self, level: ValidationLevel, tokens: Callable[[], TokenBudget]) -> list[RowRule]: ...

    def encode(self, row: Any) -> bytes: ...


SCHEMAS: dict[str, RowSchema] = {schema.name: schema for schema in (ChatSftV1(),)}


class UnknownSchema(LookupError):
    pass


def lookup(name: str) -> RowSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise UnknownSchema(f"unknown schema {name!r}; known: {', '.join(sorted(SCHEMAS))}") from None


def describe_schemas() -> list[dict]:
    """Every schema with its checks by level, for `GET /specs`."""
    return [
        {
            "name": schema.name,
            "description": schema.description,
            "default": schema.name == DEFAULT_SCHEMA,
            "checks": {
                level: [
                    {"name": c.name, "severity": c.severity, "scope": c.scope, "description": c.description}
                    for c in (*SHARED_CHECKS, *schema.checks)
                    if c.level == level
                ]
                for level in LEVELS
            },
        }
        for schema in SCHEMAS.values()
    ]
