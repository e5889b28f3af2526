"""`flywheel deadletters`: the messages no service could handle, with the reason, and replay.

A handler that rejects a message, or fails on it `max_deliver` times, moves it to the
DEADLETTER stream (`deadletter.<original subject>`, see `libs.common.bus`) with the reason,
the consumer and the original subject in its headers. Nothing is lost: the message body is
the original event. After the cause is fixed (a bad setting, a missing file, a bug), `replay`
publishes the body again on its original subject, where the same consumer picks it up, and
removes the dead letter.

A replay carries a new message id (`replay-<seq>-<original id>`): JetStream would drop the
original id as a duplicate within its duplicate window. The event inside keeps its own id, so
a service that already recorded that event still recognises it.
"""

from __future__ import annotations

import nats.js.errors

from libs.common.bus import Bus
from libs.common.deadletter import (
    MSG_ID_HEADER,
    OURS_HEADERS,
    STREAM,
    DeadLetter,
    NoSuchDeadLetter,
    describe,
    list_dead_letters,
    original_message_id,
)

__all__ = ["DeadLetter", "NoSuchDeadLetter", "describe", "format_dead_letters", "list_dead_letters", "replay"]


def replay_headers(headers: dict[str, str] | None, seq: int) -> dict[str, str]:
    """The original message's headers (its trace context included) with a fresh message id."""
    kept = {k: v for k, v in (headers or {}).items() if k not in OURS_HEADERS}
    original = original_message_id(headers or {})
    return kept | {MSG_ID_HEADER: f"replay-{seq}-{original}" if original else f"replay-{seq}"}


async def _get(bus: Bus, seq: int):
    try:
        return await bus.js.get_msg(STREAM, seq)
    except nats.js.errors.NotFoundError as exc:
        raise NoSuchDeadLetter(f"no dead letter #{seq} (replayed already, or never there)") from exc


async def replay(bus: Bus, seq: int) -> DeadLetter:
    """Publish dead letter `seq` again on its original subject, then remove it."""
    raw = await _get(bus, seq)
    letter = describe(raw.seq, raw.subject, raw.headers, raw.data or b"", raw.time)
    await bus.js.publish(letter.subject, raw.data or b"", headers=replay_headers(raw.headers, seq))
    # Only once the copy is stored: a crash in between leaves both, never neither.
    await bus.js.delete_msg(STREAM, seq)
    return letter


def format_dead_letters(letters: list[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    lines = []
    for d in letters:
        when = f"{d.time:%Y-%m-%d %H:%M:%S}" if d.time else "?"
        lines.append(f"#{d.seq:<5} {when}  {d.subject}  (consumer {d.consumer or '?'}, {d.size} bytes)")
        lines.append(f"       {d.reason}")
    lines.append("replay one after fixing its cause: flywheel deadletters --replay SEQ")
    return "\n".join(lines)
