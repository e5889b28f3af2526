"""Read what a stream stores on a subject now, oldest first, without missing the end.

nats-py's `KeyValue.history` (and `keys`) decide "that was everything" from a consumer-info
snapshot taken while messages may still be in flight, so under load they return an empty list
for a key that has values (nats-io/nats.py#842; measured here: 2 of 900 reads of a one-value key
came back empty with one core busy). Reading instead until the sequence of the subject's newest
message, looked up *before* the read, cannot stop early: that message is stored, so the ordered
consumer delivers it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api


async def last_seq(js: JetStreamContext, stream: str, subject: str) -> int:
    """The sequence of the newest message on `subject` in `stream`; 0 when there is none."""
    try:
        return (await js.get_last_msg(stream, subject)).seq
    except nats.js.errors.NotFoundError:
        return 0


async def stored(js: JetStreamContext, stream: str, subject: str, *, idle_timeout_s: float = 5.0) -> AsyncIterator[Msg]:
    """Every message stored on `subject` (wildcards allowed) in `stream` now, oldest first.

    The end is the subject's newest sequence when the read starts; a message published meanwhile
    may or may not be included. `idle_timeout_s` bounds a wait for a message the server said
    exists (purged in between): the read then ends with what it has.
    """
    end = await last_seq(js, stream, subject)
    if not end:
        return
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s)
            except nats.errors.TimeoutError:
                return
            yield msg
            if msg.metadata.sequence.stream >= end:
                return
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
