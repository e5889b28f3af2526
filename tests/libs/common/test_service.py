"""Declared subscriptions on a real bus: shared work queues with a valve, every-replica delivery,
publications limited to what is declared, and the declaration rules themselves."""

from __future__ import annotations

import asyncio

import pytest

from libs.common import topology
from libs.common.bus import Bus, UndeclaredPublication
from libs.common.events import DatasetSubmitted, ModelDeployed
from libs.common.service import Publish, Subscribe, matches
from tests.conftest import wait_for

WORK = topology.ConsumerSpec("t-work", "DATASETS", "dataset.submitted", ack_wait_s=5)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.open = asyncio.Event()

    async def on_event(self, event, delivery) -> None:
        self.seen.append(event.name if isinstance(event, DatasetSubmitted) else event.checkpoint_uri)


def deployed(name: str) -> ModelDeployed:
    return ModelDeployed(checkpoint_uri=name, checkpoint_sha256="a" * 64, run_id="r", step=1,
                         exact_match=0.5, val_loss=1.0, reason="t")


def test_matches_subjects_like_nats():
    assert matches("dataset.accepted.{priority}", "dataset.accepted.high")
    assert not matches("dataset.accepted.{priority}", "dataset.accepted.high.x")
    assert matches("control.trainer.*", "control.trainer.pause") and matches("training.>", "training.a.b")
    assert not matches("model.deployed", "model.rolled_back")


def test_a_subscription_is_either_a_work_queue_or_every_replica_and_its_consumers_match():
    with pytest.raises(ValueError, match="either"):
        Subscribe("dataset.submitted", DatasetSubmitted, Recorder.on_event)
    with pytest.raises(ValueError, match="filters"):
        Subscribe("model.deployed", ModelDeployed, Recorder.on_event, consumers=(WORK,))


@pytest.mark.integration
async def test_work_queue_takes_nothing_while_its_valve_is_shut(bus: Bus):
    await bus._ensure_consumer(WORK)
    sub = Subscribe("dataset.submitted", DatasetSubmitted, Recorder.on_event, consumers=(WORK,),
                    while_open=lambda r: r.open)
    recorder, stop = Recorder(), asyncio.Event()
    source = await bus.bind(sub)
    task = asyncio.create_task(source.run(recorder, stop))
    try:
        await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="one", rows=[]))

        async def waiting() -> bool:
            return (await bus.js.consumer_info(WORK.stream, WORK.durable)).num_pending == 1

        await wait_for(waiting, "the message stored in the consumer")
        await asyncio.sleep(1.0)  # deliberately: time in which an open loop would have taken it
        info = await bus.js.consumer_info(WORK.stream, WORK.durable)
        assert info.num_pending == 1 and info.num_ack_pending == 0 and recorder.seen == []
        recorder.open.set()
        await wait_for(lambda: recorder.seen == ["one"], "the message handled once the valve opens")
    finally:
        stop.set()
        await task


@pytest.mark.integration
async def test_every_replica_sees_every_new_event_and_none_from_before(bus: Bus, nats_server: str):
    await bus.publish(topology.MODEL_DEPLOYED, deployed("old"))
    sub = Subscribe(topology.MODEL_DEPLOYED, ModelDeployed, Recorder.on_event, every_replica=True)
    other = await Bus.connect([nats_server], "replica-2")
    replicas = [Recorder(), Recorder()]
    stop = asyncio.Event()
    sources = [await bus.bind(sub), await other.bind(sub)]
    tasks = [asyncio.create_task(s.run(r, stop)) for s, r in zip(sources, replicas)]
    try:
        await bus.publish(topology.MODEL_DEPLOYED, deployed("new-1"))
        await bus.publish(topology.MODEL_DEPLOYED, deployed("new-2"))
        await wait_for(lambda: all(r.seen == ["new-1", "new-2"] for r in replicas),
                       lambda: f"both replicas to see both deployments: {[r.seen for r in replicas]}")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await other.close()


@pytest.mark.integration
async def test_a_service_publishes_only_what_it_declares(nats_server: str):
    own = await Bus.connect([nats_server], "declared")
    own.publications = (Publish(topology.MODEL_DEPLOYED, ModelDeployed),)
    try:
        await own.ensure_topology()
        await own.publish(topology.MODEL_DEPLOYED, deployed("fine"))
        with pytest.raises(UndeclaredPublication, match="does not declare"):
            await own.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="sneaky", rows=[]))
        with pytest.raises(UndeclaredPublication):  # the declared subject, but another event type
            await own.publish(topology.MODEL_DEPLOYED, DatasetSubmitted(name="wrong type", rows=[]))
    finally:
        await own.close()


async def test_connecting_to_a_closed_port_gives_up_at_the_deadline_with_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError, match=f"cannot reach NATS at nats://127.0.0.1:{port} within 1 s"):
        await Bus.connect([f"nats://127.0.0.1:{port}"], "t", deadline_s=1.0)
    assert loop.time() - started < 10
