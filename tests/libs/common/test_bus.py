"""The bus against a real nats-server: headers, dedupe, ack/nak, heartbeats, dead letters (after
failures only, never interruptions), priority."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgspec
import nats.errors
import pytest

from libs.common import topology
from libs.common.bus import REASON_HEADER, Bus, Interrupted, Reject
from libs.common.deadletter import original_message_id
from libs.common.events import DatasetSubmitted, ModelDeployed
from libs.common.records import message_failures
from libs.common.tracing import setup_tracing, tracer
from tests.conftest import consume, wait_for

pytestmark = pytest.mark.integration

FAST = topology.ConsumerSpec("t-fast", "DATASETS", "dataset.submitted", max_deliver=2, ack_wait_s=1.5, backoff_s=(0.1,))


def submitted(name: str = "d", **kw) -> DatasetSubmitted:
    return DatasetSubmitted(name=name, rows=[{"messages": []}], **kw)


async def collect_until(bus: Bus, spec, event_type, handler, n: int, timeout: float = 15.0):
    stop = asyncio.Event()
    seen = []

    async def wrapped(event, delivery):
        await handler(event, delivery)
        seen.append((event, delivery))
        if len(seen) >= n:
            stop.set()

    task = asyncio.create_task(consume(bus, spec, event_type, wrapped, stop))
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    finally:
        stop.set()
        await task
    return seen


async def noop(event, delivery):
    return None


async def test_topology_is_idempotent(bus: Bus):
    await bus.ensure_topology()
    await bus.ensure_topology()
    names = {s.config.name for s in await bus.js.streams_info()}
    assert {s.name for s in topology.STREAMS} <= names


async def test_publish_sets_cloudevents_headers_and_traceparent(bus: Bus):
    await bus._ensure_consumer(FAST)
    setup_tracing("test", None)
    with tracer().start_as_current_span("root"):
        event = submitted()
        await bus.publish(topology.DATASET_SUBMITTED, event)
    [(got, delivery)] = await collect_until(bus, FAST, DatasetSubmitted, noop, 1)
    assert got.id == event.id and got.source == "test"
    headers = delivery.headers
    assert headers["ce-id"] == event.id == headers["Nats-Msg-Id"]
    assert headers["ce-type"] == "DatasetSubmitted"
    assert headers["ce-source"] == "flywheel/test"
    assert headers["traceparent"].count("-") == 3
    assert len(delivery.trace_id) == 32


async def test_republished_event_is_dropped_by_duplicate_window(bus: Bus):
    event = submitted()
    first = await bus.publish(topology.DATASET_SUBMITTED, event)
    second = await bus.publish(topology.DATASET_SUBMITTED, event)
    assert not first.duplicate and second.duplicate
    info = await bus.js.stream_info("DATASETS")
    assert info.state.messages == 1


async def test_failing_handler_is_retried_then_dead_lettered_with_reason(bus: Bus):
    await bus._ensure_consumer(FAST)
    attempts = []

    async def failing(event, delivery):
        attempts.append(delivery.num_delivered)
        raise RuntimeError("boom")

    event = submitted()
    await bus.publish(topology.DATASET_SUBMITTED, event)
    stop = asyncio.Event()
    task = asyncio.create_task(consume(bus, FAST, DatasetSubmitted, failing, stop))
    dead = await bus.js.subscribe("deadletter.dataset.submitted")
    msg = await dead.next_msg(timeout=15)
    stop.set()
    await task
    assert attempts == [1, 2]
    assert "boom" in msg.headers[REASON_HEADER]
    assert msgspec.json.decode(msg.data)["id"] == event.id


async def abandon(bus: Bus, spec: topology.ConsumerSpec, times: int) -> None:
    """Take the next message `times` times and never settle it, as a consumer killed mid-job does."""
    sub = await bus.js.pull_subscribe_bind(spec.durable, spec.stream)
    try:
        for _ in range(times):  # each time it comes back once the ack wait has passed
            await sub.fetch(1, timeout=spec.ack_wait_s + 10)
    finally:
        await sub.unsubscribe()


def scripted(*outcomes: str):
    """A handler that, delivery after delivery, is interrupted, fails or succeeds as told
    (then succeeds); it records (num_delivered, failures) of each delivery it sees."""
    seen: list[tuple[int, int]] = []
    script = iter(outcomes)

    async def handle(event, delivery):
        seen.append((delivery.num_delivered, delivery.failures))
        outcome = next(script, "ok")
        if outcome == "interrupted":
            raise Interrupted("stopped on purpose")
        if outcome == "fail":
            raise RuntimeError("boom")

    return handle, seen


async def test_interruptions_and_kills_never_use_up_a_messages_tries(bus: Bus):
    # max_deliver 2, yet 2 abandoned deliveries, 3 interruptions and a failure later the
    # message is still handled: only failures count.
    await bus._ensure_consumer(FAST)
    await bus.publish(topology.DATASET_SUBMITTED, submitted())
    await abandon(bus, FAST, 2)
    handler, seen = scripted("interrupted", "interrupted", "interrupted", "fail")
    stop = asyncio.Event()
    dead = await bus.js.subscribe("deadletter.dataset.submitted")
    task = asyncio.create_task(consume(bus, FAST, DatasetSubmitted, handler, stop))
    await wait_for(lambda: len(seen) == 5, lambda: f"5 deliveries, saw {seen}")

    async def settled():
        info = await bus.js.consumer_info(FAST.stream, FAST.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(settled, "the message to be acked")
    stop.set()
    await task
    assert seen == [(3, 0), (4, 0), (5, 0), (6, 0), (7, 1)]
    with pytest.raises(nats.errors.TimeoutError):
        await dead.next_msg(timeout=0.5)
    info = await bus.js.stream_info("DATASETS")
    failures, _ = await (await bus.record(message_failures(FAST.durable, info.state.last_seq))).read()
    assert failures is None  # settled: its count is gone


async def test_a_message_interrupted_more_than_max_deliver_times_is_dead_lettered_after_max_deliver_failures(bus: Bus):
    await bus._ensure_consumer(FAST)
    event = submitted()
    await bus.publish(topology.DATASET_SUBMITTED, event)
    handler, seen = scripted("interrupted", "fail", "interrupted", "interrupted", "fail")
    stop = asyncio.Event()
    dead = await bus.js.subscribe("deadletter.dataset.submitted")
    task = asyncio.create_task(consume(bus, FAST, DatasetSubmitted, handler, stop))
    msg = await dead.next_msg(timeout=15)
    stop.set()
    await task
    assert seen == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert msg.headers[REASON_HEADER] == "failed 2 times, last: RuntimeError('boom')"
    assert msgspec.json.decode(msg.data)["id"] == event.id


async def test_still_queued_follows_a_message_until_it_is_settled_or_gone(bus: Bus):
    spec = topology.ConsumerSpec("t-one", "DATASETS", "dataset.submitted", max_ack_pending=1)
    await bus._ensure_consumer(spec)
    first = (await bus.publish(topology.DATASET_SUBMITTED, submitted("a"))).seq
    second = (await bus.publish(topology.DATASET_SUBMITTED, submitted("b"))).seq
    assert await bus.still_queued(spec, first)  # not delivered yet
    sub = await bus.js.pull_subscribe_bind(spec.durable, spec.stream)
    try:
        [msg] = await sub.fetch(1, timeout=5)
        assert await bus.still_queued(spec, first)  # delivered, not settled
        await msg.ack_sync()
        assert not await bus.still_queued(spec, first) and await bus.still_queued(spec, second)
        [msg] = await sub.fetch(1, timeout=5)
        await msg.term()  # as a dead letter is settled
        await wait_for(lambda: _not_queued(bus, spec, second), "the terminated message to be settled")
    finally:
        await sub.unsubscribe()
    assert not await bus.still_queued(spec, second + 100)  # never in the stream


async def _not_queued(bus: Bus, spec: topology.ConsumerSpec, sequence: int) -> bool:
    return not await bus.still_queued(spec, sequence)


async def test_undecodable_payload_goes_straight_to_dead_letter(bus: Bus):
    await bus._ensure_consumer(FAST)
    await bus.js.publish("dataset.submitted", b"{not json")
    await bus.publish(topology.DATASET_SUBMITTED, submitted("good"))
    seen = await collect_until(bus, FAST, DatasetSubmitted, noop, 1)
    assert seen[0][0].name == "good"
    dead = await bus.js.subscribe("deadletter.dataset.submitted", deliver_policy=None)
    msg = await dead.next_msg(timeout=5)
    assert "does not decode" in msg.headers[REASON_HEADER]


async def test_reject_dead_letters_without_retry(bus: Bus):
    await bus._ensure_consumer(FAST)
    calls = []

    async def refuse(event, delivery):
        calls.append(1)
        raise Reject("never valid")

    await bus.publish(topology.DATASET_SUBMITTED, submitted())
    stop = asyncio.Event()
    task = asyncio.create_task(consume(bus, FAST, DatasetSubmitted, refuse, stop))
    dead = await bus.js.subscribe("deadletter.dataset.submitted")
    msg = await dead.next_msg(timeout=10)
    stop.set()
    await task
    assert calls == [1] and "never valid" in msg.headers[REASON_HEADER]


async def test_long_handler_keeps_its_lease_with_heartbeats(bus: Bus):
    spec = topology.ConsumerSpec("t-long", "DATASETS", "dataset.submitted", ack_wait_s=1.0, long_running=True)
    await bus._ensure_consumer(spec)
    rival = await bus.js.pull_subscribe_bind(spec.durable, spec.stream)
    deliveries, taken_by_rival = [], []

    async def slow(event, delivery):
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(3.5)  # 3.5x the ack wait
        # Had the lease lapsed, the message would be free again: a second puller would get it.
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            taken_by_rival.extend(await rival.fetch(1, timeout=0.5))

    await bus.publish(topology.DATASET_SUBMITTED, submitted())
    await collect_until(bus, spec, DatasetSubmitted, slow, 1)
    await rival.unsubscribe()  # a pull subscription left open holds up the bus's drain

    async def acked():
        info = await bus.js.consumer_info("DATASETS", "t-long")
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None

    info = await wait_for(acked, "the message to be acked")
    assert deliveries == [1] and not taken_by_rival
    assert info.num_redelivered == 0


async def test_priority_consumers_drain_high_before_low(bus: Bus):
    for p in ("low", "normal", "high"):
        for i in range(2):
            await bus.publish(topology.dataset_accepted(p), ModelDeployed(
                checkpoint_uri=f"{p}{i}", checkpoint_sha256="x", run_id="r", step=i, exact_match=0, val_loss=0, reason="t"))
    order = []

    async def record(event, delivery):
        order.append(event.checkpoint_uri)

    await collect_until(bus, topology.TRAINER, ModelDeployed, record, 6)
    assert order == ["high0", "high1", "normal0", "normal1", "low0", "low1"]


async def test_request_reply_round_trip(bus: Bus):
    from libs.common.events import ControlReply, ControlTraining

    async def answer(request: ControlTraining, subject: str) -> ControlReply:
        return ControlReply(ok=True, state=request.action, message=subject)

    await bus.serve("control.trainer.*", ControlTraining, answer)
    reply = await bus.request("control.trainer.pause", ControlTraining(action="pause"), ControlReply)
    assert reply.ok and reply.state == "pause" and reply.message == "control.trainer.pause"
    bad = await bus.request("control.trainer.pause", ControlReply(ok=True, state="x"), ControlReply)
    assert not bad.ok and "bad request" in bad.message


async def test_two_consumers_dead_lettering_the_same_event_keep_both_reasons(bus: Bus):
    # Two consumers of one subject (as the curriculum and inference both follow model.deployed): each refusal is its own dead letter.
    other = topology.ConsumerSpec("t-other", "DATASETS", "dataset.submitted", max_deliver=2, ack_wait_s=1.5,
                                  backoff_s=(0.1,))
    await bus._ensure_consumer(FAST)
    await bus._ensure_consumer(other)
    await bus.publish(topology.DATASET_SUBMITTED, submitted())
    dead = await bus.js.subscribe("deadletter.dataset.submitted")
    stop = asyncio.Event()

    def refusing(reason: str):
        async def refuse(event, delivery):
            raise Reject(reason)
        return refuse

    tasks = [asyncio.create_task(consume(bus, spec, DatasetSubmitted, refusing(f"{spec.durable} refuses"), stop))
             for spec in (FAST, other)]
    letters = [await dead.next_msg(timeout=10) for _ in range(2)]
    stop.set()
    await asyncio.gather(*tasks)
    assert sorted(m.headers[REASON_HEADER].removeprefix("rejected by handler: ") for m in letters) == [
        "t-fast refuses", "t-other refuses"]
    assert len({m.headers["Nats-Msg-Id"] for m in letters}) == 2
    # Both name the message they are copies of.
    assert {original_message_id(m.headers) for m in letters} == {letters[0].headers["Flywheel-Original-Msg-Id"]} != {""}
    stored = await bus.js.stream_info(topology.stream_for("deadletter.dataset.submitted"))
    assert stored.state.messages == 2  # neither was dropped as a duplicate of the other


async def test_a_restart_keeps_an_operators_stream_settings_and_updates_only_ours(bus: Bus):
    from nats.js import api

    info = await bus.js.stream_info("DATASETS")
    # An operator caps the stream's message count and describes it; a newer Flywheel shortens the window.
    tuned = dataclasses.replace(info.config, max_msgs=5000, description="ops: capped", duplicate_window=60.0)
    await bus.js.update_stream(tuned)
    await bus.ensure_topology()  # what every service start does
    config = (await bus.js.stream_info("DATASETS")).config
    assert config.max_msgs == 5000 and config.description == "ops: capped"  # theirs: kept
    spec = next(s for s in topology.STREAMS if s.name == "DATASETS")
    assert config.duplicate_window == spec.duplicate_window_s and config.subjects == list(spec.subjects)  # ours: restored
    assert config.num_replicas == 1 and config.retention == api.RetentionPolicy.LIMITS
