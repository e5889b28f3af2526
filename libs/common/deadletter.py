"""Dead letters as they are stored: the DEADLETTER stream's messages with their reason.

A handler that rejects a message, or fails on it `max_deliver` times, moves it to the
DEADLETTER stream (`deadletter.<original subject>`, see `libs.common.bus`) with the reason, the
consumer and the original subject in its headers; the body is the original event. Read by
`flywheel deadletters` and the dashboard.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
import nats.js.errors

from libs.common import topology
from libs.common.bus import CONSUMER_HEADER, ORIGINAL_ID_HEADER, REASON_HEADER, SUBJECT_HEADER, Bus

STREAM = "DEADLETTER"
MSG_ID_HEADER = "Nats-Msg-Id"
OURS_HEADERS = (REASON_HEADER, CONSUMER_HEADER, SUBJECT_HEADER, ORIGINAL_ID_HEADER, MSG_ID_HEADER)


def original_message_id(headers: dict[str, str]) -> str:
    """The dead-lettered message's own Nats-Msg-Id ("" if it had none); letters stored before the
    id header existed carry it as their own id after "dead-"."""
    return headers.get(ORIGINAL_ID_HEADER) or headers.get(MSG_ID_HEADER, "").removeprefix("dead-")


class NoSuchDeadLetter(LookupError):
    """No dead letter has this sequence number (never, or replayed already)."""


class DeadLetter(msgspec.Struct, frozen=True):
    seq: int
    time: datetime | None
    subject: str  # where it was published first, and where a replay goes
    consumer: str
    reason: str
    message_id: str  # the original Nats-Msg-Id ("" if it had none)
    size: int


def describe(seq: int, subject: str, headers: dict[str, str] | None, data: bytes, time: datetime | None) -> DeadLetter:
    headers = headers or {}
    original = headers.get(SUBJECT_HEADER) or subject.removeprefix(f"{topology.DEAD_LETTER_PREFIX}.")
    return DeadLetter(
        seq=seq, time=time, subject=original, consumer=headers.get(CONSUMER_HEADER, ""),
        reason=headers.get(REASON_HEADER, ""), message_id=original_message_id(headers),
        size=len(data),
    )


async def list_dead_letters(bus: Bus, limit: int = 100) -> list[DeadLetter]:
    """The most recent `limit` dead letters, oldest first."""
    state = (await bus.js.stream_info(STREAM)).state
    letters: list[DeadLetter] = []
    seq = state.last_seq
    while seq >= max(state.first_seq, 1) and len(letters) < limit and state.messages:
        try:
            raw = await bus.js.get_msg(STREAM, seq)
        except nats.js.errors.NotFoundError:  # a gap: replayed and removed
            seq -= 1
            continue
        letters.append(describe(raw.seq, raw.subject, raw.headers, raw.data or b"", raw.time))
        seq -= 1
    return list(reversed(letters))
