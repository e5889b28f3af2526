"""A service declared in one place: what it consumes, publishes and answers, and its routes.

Every `services/<name>/service.py` ends with one `Service(...)`; `python -m services.<name>`
hands it to the runtime (`libs.common.runtime.run`), which starts exactly what is declared, and
`flywheel asyncapi` renders the event contract from the same declarations, so the document
cannot drift from the code. The declarations are plain data: the handlers are the service
class's own methods, called on the one instance that `build` returns.

Two ways to receive events, one mechanism:
- a shared durable work queue (`consumers=`): replicas share the work, each event is handled
  once; several consumers are drained in the order given (priorities); `while_open` names an
  `asyncio.Event` of the service that must be set for new work to be taken (trainer pause);
- every replica sees every new event (`every_replica=True`): an ordered consumer per process
  that starts at the newest message (inference follows deployments this way).
Publishing to a subject that is not declared raises: a service cannot publish behind the
contract's back.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from libs.common.topology import ConsumerSpec

if TYPE_CHECKING:  # the runtime imports this module; only its type is needed here
    from fastapi import APIRouter

    from libs.common.http import ApiError
    from libs.common.runtime import ServiceRuntime

T = TypeVar("T")


def subject_pattern(address: str) -> re.Pattern[str]:
    """`dataset.accepted.{priority}` matches dataset.accepted.high; `*` and `>` as NATS does."""
    parts = []
    for token in address.split("."):
        if token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif token == "*" or (token.startswith("{") and token.endswith("}")):
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


def matches(address: str, subject: str) -> bool:
    return subject_pattern(address).fullmatch(subject) is not None


@dataclass(frozen=True)
class Subscribe(Generic[T]):
    """Events of `event_type` on `subject`, handled by `handler(service, event, delivery)`."""

    subject: str
    event_type: type[msgspec.Struct]
    handler: Callable[[T, Any, Any], Awaitable[None]]
    consumers: tuple[ConsumerSpec, ...] = ()
    every_replica: bool = False
    while_open: Callable[[T], asyncio.Event] | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.every_replica == bool(self.consumers):
            raise ValueError(f"{self.subject}: declare either consumers (a shared work queue) or every_replica")
        for consumer in self.consumers:
            if not matches(self.subject, consumer.filter_subject):
                raise ValueError(f"consumer {consumer.durable} filters {consumer.filter_subject}, not {self.subject}")

    @property
    def delivery(self) -> str:
        return "every replica" if self.every_replica else "shared work queue (" + ", ".join(
            c.durable for c in self.consumers) + ")"


@dataclass(frozen=True)
class Publish:
    """Events of `event_type` published on `subject` (a `{parameter}` stands for one token)."""

    subject: str
    event_type: type[msgspec.Struct]
    summary: str = ""


@dataclass(frozen=True)
class Reply(Generic[T]):
    """Core NATS request/reply on `subject`: `handler(service, request, subject) -> reply`."""

    subject: str
    request_type: type[msgspec.Struct]
    reply_type: type[msgspec.Struct]
    handler: Callable[[T, Any, str], Awaitable[msgspec.Struct]]
    summary: str = ""


@dataclass(frozen=True)
class Request:
    """A client's side of a `Reply` (documented in the contract; the CLI declares these)."""

    subject: str
    request_type: type[msgspec.Struct]
    reply_type: type[msgspec.Struct]
    summary: str = ""


@dataclass(frozen=True)
class Client:
    """Something outside the six services that publishes or requests: the CLI, any client."""

    name: str
    publications: tuple[Publish, ...] = ()
    requests: tuple[Request, ...] = ()


@dataclass(frozen=True)
class Service(Generic[T]):
    """Everything the runtime starts for one service, in the order it starts them.

    1. `build(runtime)` creates the service object (loads models, opens KV buckets, ...);
    2. `routes(service)` gives its HTTP routes, `readiness(service)` its /ready checks; every
       HTTP error answers in the shape of `errors` (default FastAPI's, libs/common/http.py);
    3. `replies` are served, `subscriptions` and `loops` run until the service stops;
    4. on SIGTERM `on_stop(service)` is called at once (interrupt long work), in-flight
       handlers get the grace period, then `close(service)`.
    """

    name: str
    settings: type
    build: Callable[[ServiceRuntime], Awaitable[T]]
    subscriptions: tuple[Subscribe[T], ...] = ()
    publications: tuple[Publish, ...] = ()
    replies: tuple[Reply[T], ...] = ()
    routes: Callable[[T], APIRouter] | None = None
    errors: type[ApiError] | None = None
    readiness: Callable[[T], Mapping[str, Callable[[], bool]]] | None = None
    loops: tuple[Callable[[T, asyncio.Event], Awaitable[None]], ...] = ()
    on_stop: Callable[[T], None] | None = None
    close: Callable[[T], Awaitable[None]] | None = None
