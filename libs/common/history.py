"""The streams as history: every stored event with where it sits and the trace it belongs to.

The streams are Flywheel's record of what happened (`libs.common.topology.STREAMS` keep 30
days), so read models are rebuilt from them instead of from files: `read_history` returns what
is stored now (for a one-shot answer such as `flywheel lineage`), `follow` replays a stream from
its first message and then keeps delivering new ones (the dashboard). Both read through ordered
consumers of this process alone: nothing durable is created, nothing is acknowledged, and no
service's work queue is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import AnyEvent
from libs.common.stored import stored
from libs.common.tracing import trace_id_from_headers

_decoder = msgspec.json.Decoder(AnyEvent)


class Recorded(msgspec.Struct, frozen=True):
    """One stored message: the event (None for a dead letter or a body that is no event), the
    stream and sequence that place it, its subject, when it was stored and its trace id."""

    stream: str
    seq: int
    subject: str
    stored: datetime | None
    trace_id: str
    event: AnyEvent | None
    headers: dict[str, str] = {}


def record_of(msg: Msg, decode: Callable[[bytes], AnyEvent] = _decoder.decode) -> Recorded:
    """A delivered JetStream message as a `Recorded`; a body `decode` refuses gives event=None."""
    meta = msg.metadata
    try:
        event = decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        event = None
    return Recorded(
        stream=meta.stream, seq=meta.sequence.stream, subject=msg.subject, stored=meta.timestamp,
        trace_id=trace_id_from_headers(msg.headers), event=event, headers=dict(msg.headers or {}),
    )


async def read_subject(bus: Bus, subject: str, *, idle_timeout_s: float = 5.0,
                       decode: Callable[[bytes], AnyEvent] = _decoder.decode) -> list[Recorded]:
    """Every message stored on `subject` (wildcards allowed) now, oldest first, each body read by
    `decode` (a reader that needs less than the whole event may skip the rest); the end is as
    `libs.common.stored.stored` draws it."""
    return [record_of(msg, decode) async for msg in stored(bus.js, topology.stream_for(subject), subject,
                                                           idle_timeout_s=idle_timeout_s)]


async def read_history(bus: Bus, subjects: Iterable[str]) -> list[Recorded]:
    """Every message stored on `subjects` now, read concurrently, ordered by when it was stored."""
    parts = await asyncio.gather(*(read_subject(bus, s) for s in subjects))
    return sorted((r for part in parts for r in part), key=lambda r: (r.stored or datetime.min, r.stream, r.seq))


async def follow(bus: Bus, stream: str, on_record: Callable[[Recorded], Awaitable[None] | None],
                 stop: asyncio.Event, *, subject: str = ">") -> None:
    """Deliver every message of `stream` on `subject` from the first stored one, then each new one,
    until `stop` is set. An ordered consumer re-creates itself after a reconnect where it left off.
    """
    sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            result = on_record(record_of(msg))
            if asyncio.iscoroutine(result):
                await result
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def stream_end(bus: Bus, stream: str) -> int:
    """The stream's newest sequence now: a follower that reached it has replayed the history."""
    return (await bus.js.stream_info(stream)).state.last_seq
