"""What the trials feed the stack and how they wait for it: datasets, manual deploys, the moments
a service is at work (triggers), and quiescence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

import httpx
import msgspec
import nats.errors

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import DatasetSubmitted, DeployCheckpoint, DeployReply, new_id
from libs.common.records import DEPLOYMENT
from services.curriculum.synthesis import synthetic_dataset
from tests.faults.ledger import Ledger
from tests.faults.stack import SERVICES, FaultStack

# Binary level 3 has thousands of distinct problems: every dataset is new content (a repeat
# would be answered as a duplicate, not trained), ~10 steps of the tiny model.
LEVEL = 3
ROWS = 96
_numbers = itertools.count(1)


def dataset(rows: int = ROWS, *, name: str = "faults") -> DatasetSubmitted:
    """A fresh valid dataset, inline (as the curriculum submits one), of new content every call."""
    number = next(_numbers)
    made = synthetic_dataset("binary", LEVEL, number, rows)
    return msgspec.structs.replace(made, id=new_id(), name=f"{name}-{number}", priority="normal",
                                   submitted_by="fault-suite", channel="nats")


async def submit(bus: Bus, event: DatasetSubmitted | None = None) -> DatasetSubmitted:
    event = event or dataset()
    await bus.publish(topology.DATASET_SUBMITTED, event, attempts=5)
    return event


async def manual_deploy(bus: Bus, checkpoint: str) -> DeployReply | None:
    """Ask the deployer to stage `checkpoint` (None: no answer, e.g. the deployer is down)."""
    try:
        return await bus.request(topology.CONTROL_DEPLOYER_DEPLOY,
                                 DeployCheckpoint(checkpoint=checkpoint, requested_by="fault-suite"),
                                 DeployReply, timeout=5)
    except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
        return None


# ---------------------------------------------------------------------------- triggers


class Triggers:
    """Core-NATS taps on the stored subjects: `next(...)` waits for the next matching message,
    `first(...)` for the first since the taps were opened (it may have come already)."""

    SUBJECTS = ("dataset.>", "training.>", "checkpoint.>", "eval.>", "model.>")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._waiters: list[tuple[Callable[[str, bytes], bool], asyncio.Future]] = []
        self._subs = []
        self.seen: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> Triggers:
        for subject in self.SUBJECTS:
            self._subs.append(await self.bus.nc.subscribe(subject, cb=self._on))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on(self, msg) -> None:
        self.seen.append((msg.subject, msg.data))
        for predicate, future in list(self._waiters):
            if not future.done() and predicate(msg.subject, msg.data):
                future.set_result((msg.subject, msg.data))

    async def first(self, predicate: Callable[[str, bytes], bool], timeout: float) -> tuple[str, bytes] | None:
        for subject, data in self.seen:
            if predicate(subject, data):
                return subject, data
        return await self.next(predicate, timeout)

    async def next(self, predicate: Callable[[str, bytes], bool], timeout: float) -> tuple[str, bytes] | None:
        future = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiters.remove(entry)


# ---------------------------------------------------------------------------- waiting


async def all_ready(stack: FaultStack, timeout: float, services: tuple[str, ...] = SERVICES) -> float:
    """Wait until every service answers /ready; the seconds it took."""
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        while True:
            ready = [await stack.aready(client, s) for s in services]
            if all(ready):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                late = [s for s, ok in zip(services, ready, strict=True) if not ok]
                raise AssertionError(f"not ready after {timeout:g}s: {late}")
            await asyncio.sleep(0.5)


async def consumers_idle(bus: Bus) -> list[str]:
    """The durable consumers that still hold messages (waiting or in progress); [] when all are idle."""
    busy = []
    for spec in topology.CONSUMERS:
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        if info.num_pending or info.num_ack_pending:
            busy.append(f"{spec.durable} ({info.num_pending} waiting, {info.num_ack_pending} in progress)")
    return busy


async def quiet(bus: Bus, stack: FaultStack, timeout: float, *, until: Callable[[Ledger], bool] | None = None) -> Ledger:
    """Wait until the stack is quiet: every service ready, every consumer idle, no staged deployment
    and (`until`) whatever else the trial waits for; the ledger then. On timeout, the ledger as it
    is (the invariants then show what did not settle)."""
    deadline = time.monotonic() + timeout
    deployment = await bus.record(DEPLOYMENT)
    ledger = None
    while time.monotonic() < deadline:
        try:
            await all_ready(stack, max(1.0, deadline - time.monotonic()))
            if not await consumers_idle(bus):
                current, _ = await deployment.read()
                if current is None or current.state != "staged":
                    ledger = await Ledger.read(bus)
                    if until is None or until(ledger):
                        return ledger
        except (nats.errors.Error, TimeoutError, AssertionError):
            pass
        await asyncio.sleep(1.0)
    return ledger or await Ledger.read(bus)
