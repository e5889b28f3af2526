"""One trainer per base model at a time: a lease in JetStream KV (`libs.common.records.trainer_lease`).

The holder trains; it renews the lease (a compare-and-set on the record's revision) every
`renew_s`. Any other trainer of the same model is a hot standby: started, ready, taking no
datasets, reading the lease every second or so. It takes over when:
- the holder released the lease (stopped cleanly, SIGTERM): at once;
- the lease went `duration_s` without a renewal (the holder died, kill -9, or is cut off): the
  standby measures that on its own monotonic clock from the moment it first saw the current
  revision, so no two hosts' clocks are ever compared.
Taking over is itself a compare-and-set on the revision the standby judged: of two standbys,
one wins.

The holder judges its own lease by its clock too: counted from the start of its last
successful renewal, it gives the lease up after `duration_s - renew_s` (`lost`). A standby
starts counting only once it has seen that renewal, which happened after its start, so the
holder always lets go at least `renew_s` before anyone may take over. A renewal that finds
another holder (compare-and-set conflict) is lost at once.

Not JetStream's per-key TTL: in nats-py 2.16 only `KeyValue.create` takes `msg_ttl`, `update`
does not, so a renewal (a compare-and-set update) could not extend it, and the `trainer` bucket
of an existing install would first need `allow_msg_ttl`. Expiry judged by how long the revision
stood still needs neither, and no clock but the judge's own.

`LeaseWatch` and `HolderClock` are the decisions (pure, clock injected); `Lease` does the I/O.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from libs.common.events import utcnow
from libs.common.kv import Record, RevisionConflict
from libs.common.records import TrainerLease

Clock = Callable[[], float]


def holder_id() -> str:
    """This process's name in leases: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class LeaseWatch:
    """A standby's view of someone else's lease: expired once its revision stood still for its duration."""

    clock: Clock = time.monotonic
    revision: int = 0
    seen_at: float = 0.0

    def expired(self, lease: TrainerLease | None, revision: int) -> bool:
        """Whether the lease at `revision` may be taken now (absent and released ones may)."""
        if lease is None or lease.released:
            return True
        now = self.clock()
        if revision != self.revision:  # renewed (or newly taken) since the last look: count afresh
            self.revision, self.seen_at = revision, now
            return False
        return now - self.seen_at >= lease.duration_s


@dataclass
class HolderClock:
    """The holder's view of its own lease: valid until `duration_s - renew_s` after the start of
    its last successful renewal."""

    duration_s: float
    renew_s: float
    clock: Clock = time.monotonic
    renewed_from: float | None = None

    def renewed(self, started_at: float) -> None:
        self.renewed_from = started_at

    def valid(self) -> bool:
        return self.renewed_from is not None and self.clock() - self.renewed_from < self.duration_s - self.renew_s


class Lease:
    """This trainer's side of one model's lease."""

    def __init__(self, record: Record[TrainerLease], me: str, *, duration_s: float, renew_s: float,
                 clock: Clock = time.monotonic) -> None:
        self.record = record
        self.me = me
        self.duration_s = duration_s
        self.renew_s = renew_s
        self.clock = clock
        self.watch = LeaseWatch(clock)
        self.own = HolderClock(duration_s, renew_s, clock)
        self.revision = 0
        self.holding = False
        # The lease as last read: who holds it (for /status while standing by).
        self.seen: TrainerLease | None = None

    async def try_acquire(self) -> bool:
        """Take the lease if it is free, released or expired; True when this trainer holds it now."""
        started = self.clock()
        lease, revision = await self.record.read()
        self.seen = lease
        if lease is not None and lease.holder == self.me and not lease.released:
            # Still ours (a renewal that failed to answer but was stored): renew it.
            self.revision, self.holding = revision, True
            return await self.renew()
        if not self.watch.expired(lease, revision):
            return False
        now = utcnow()
        mine = TrainerLease(holder=self.me, host=socket.gethostname(), pid=os.getpid(), duration_s=self.duration_s,
                            acquired_at=now, renewed_at=now)
        try:
            self.revision = await self.record.write(mine, revision)
        except RevisionConflict:
            return False  # another standby was faster
        self.own.renewed(started)
        self.holding, self.seen = True, mine
        return True

    async def renew(self) -> bool:
        """Renew the lease; False once it is lost (another holder, or no renewal for too long).

        A NATS error is not a loss by itself: the lease holds until `HolderClock` says it does
        not; the error is raised for the caller to log and the next renewal tries again.
        """
        started = self.clock()
        try:
            current = self.seen if self.seen is not None and self.seen.holder == self.me else None
            renewed = msgspec.structs.replace(current, renewed_at=utcnow()) if current else None
            if renewed is None:
                self.holding = False
                return False
            self.revision = await self.record.write(renewed, self.revision)
        except RevisionConflict:
            self.holding = False
            return False
        except Exception:
            if not self.own.valid():
                self.holding = False
            raise
        self.own.renewed(started)
        self.seen = renewed
        return True

    def still_valid(self) -> bool:
        """Whether this trainer may still act as the holder (by its own clock)."""
        return self.holding and self.own.valid()

    async def release(self) -> None:
        """Let go (a clean stop): a standby takes over at once instead of waiting for the expiry."""
        if not self.holding or self.seen is None:
            return
        self.holding = False
        try:
            await self.record.write(msgspec.structs.replace(self.seen, released=True, renewed_at=utcnow()),
                                    self.revision)
        except RevisionConflict:
            pass  # someone took it already
