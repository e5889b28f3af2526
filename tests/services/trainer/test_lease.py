"""Unit: the lease decisions with an injected clock; integration: two trainers' leases on a real
nats-server (one holds, the other waits; release and expiry hand it over; a conflict is a loss)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.common.records import TrainerLease, trainer_lease
from services.trainer.lease import HolderClock, Lease, LeaseWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lease(**fields) -> TrainerLease:
    at = datetime(2025, 1, 1, tzinfo=UTC)
    return TrainerLease(**{"holder": "a", "duration_s": 15.0, "acquired_at": at, "renewed_at": at, **fields})


def test_a_lease_expires_only_after_its_revision_stood_still_for_its_duration_on_the_watchers_clock():
    clock = Clock()
    watch = LeaseWatch(clock)
    assert not watch.expired(lease(), 3)  # first seen now
    clock.now += 14.9
    assert not watch.expired(lease(), 3)
    clock.now += 0.2
    assert watch.expired(lease(), 3)
    assert not watch.expired(lease(), 4)  # renewed meanwhile: counted afresh
    clock.now += 15
    assert watch.expired(lease(), 4)


def test_absent_and_released_leases_may_be_taken_at_once():
    watch = LeaseWatch(Clock())
    assert watch.expired(None, 0) and watch.expired(lease(released=True), 9)


def test_the_holder_lets_go_a_renewal_period_before_any_watcher_may_take_over():
    clock = Clock()
    own = HolderClock(duration_s=15, renew_s=5, clock=clock)
    assert not own.valid()  # never renewed
    own.renewed(clock.now)
    clock.now += 9.9
    assert own.valid()
    clock.now += 0.2
    assert not own.valid()


@pytest.mark.integration
async def test_one_holds_the_other_waits_then_takes_over_on_release_or_expiry(bus):
    clock = Clock()
    record = await bus.record(trainer_lease("m1"))
    first = Lease(record, "first", duration_s=15, renew_s=5, clock=clock)
    second = Lease(await bus.record(trainer_lease("m1")), "second", duration_s=15, renew_s=5, clock=clock)
    assert await first.try_acquire() and first.still_valid()
    assert not await second.try_acquire() and second.seen.holder == "first"

    await first.release()  # a clean stop: taken at once
    assert await second.try_acquire() and second.holding
    assert not await first.try_acquire()

    # The holder dies: nothing renews; after the duration (on the watcher's clock) it is taken.
    assert not await first.try_acquire()
    clock.now += 15.1
    assert await first.try_acquire() and first.holding
    # The old holder's renewal finds another holder: lost at once, nothing overwritten.
    assert not await second.renew() and not second.holding
    current, _ = await record.read()
    assert current.holder == "first" and not current.released
