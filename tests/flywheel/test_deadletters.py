"""`flywheel deadletters`: dead letters listed with their reasons, and replayed after a fix."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.deadletters import (
    NoSuchDeadLetter,
    describe,
    format_dead_letters,
    list_dead_letters,
    replay,
    replay_headers,
)
from libs.common import topology
from libs.common.bus import REASON_HEADER, Bus, Reject
from libs.common.events import DatasetSubmitted, new_id
from tests.conftest import consume, wait_for
from tests.flywheel.test_cli import cli_env, run_cli_async

SPEC = topology.ConsumerSpec("t-dead", "DATASETS", "dataset.submitted", max_deliver=2, ack_wait_s=1.5, backoff_s=(0.1,))


def test_a_dead_letter_is_described_by_its_headers():
    headers = {REASON_HEADER: "rejected by handler: no such file", "Flywheel-Consumer": "gatekeeper",
               "Flywheel-Original-Subject": "dataset.submitted", "Nats-Msg-Id": "dead-abc", "traceparent": "00-x"}
    letter = describe(7, "deadletter.dataset.submitted", headers, b"{}", None)
    assert (letter.seq, letter.subject, letter.consumer) == (7, "dataset.submitted", "gatekeeper")
    assert letter.message_id == "abc"
    assert letter.reason == "rejected by handler: no such file"
    # Without our headers (published by hand): the subject comes from the dead letter's own.
    assert describe(8, "deadletter.model.deployed", None, b"", None).subject == "model.deployed"
    assert "#7" in format_dead_letters([letter]) and "no such file" in format_dead_letters([letter])
    assert format_dead_letters([]) == "no dead letters"


def test_a_replay_keeps_the_trace_context_and_gets_a_fresh_message_id():
    headers = {REASON_HEADER: "r", "Flywheel-Consumer": "c", "Flywheel-Original-Subject": "s",
               "Nats-Msg-Id": "dead-abc", "traceparent": "00-x"}
    assert replay_headers(headers, 7) == {"traceparent": "00-x", "Nats-Msg-Id": "replay-7-abc"}
    assert replay_headers(None, 9) == {"Nats-Msg-Id": "replay-9"}


@pytest.mark.integration
async def test_a_rejected_message_is_listed_with_its_reason_and_handled_once_replayed(bus: Bus, nats_server: str,
                                                                                      tmp_path):
    await bus._ensure_consumer(SPEC)
    fixed = asyncio.Event()
    handled: list[str] = []

    async def handler(event: DatasetSubmitted, delivery) -> None:
        if not fixed.is_set():
            raise Reject("the dataset file is missing")
        handled.append(event.id)

    event = DatasetSubmitted(id=new_id(), name="d", rows=[{"messages": []}], submitted_by="test")
    stop = asyncio.Event()
    task = asyncio.create_task(consume(bus, SPEC, DatasetSubmitted, handler, stop))
    try:
        await bus.publish(topology.DATASET_SUBMITTED, event)
        letters = []

        async def listed() -> bool:
            letters[:] = await list_dead_letters(bus)
            return bool(letters)

        await wait_for(listed, "the dead letter")
        [letter] = letters
        assert letter.subject == "dataset.submitted" and letter.consumer == "t-dead"
        assert "the dataset file is missing" in letter.reason and letter.message_id == event.id

        # The command line shows the same, with the way to replay it.
        env = cli_env(tmp_path / "data", nats_server)
        code, out, _ = await run_cli_async("deadletters", env=env)
        assert code == 0 and f"#{letter.seq}" in out and "the dataset file is missing" in out and "--replay" in out

        fixed.set()  # the cause is fixed: replay it
        code, out, err = await run_cli_async("deadletters", "--replay", str(letter.seq), "--json", env=env)
        assert code == 0, err
        assert json.loads(out)["seq"] == letter.seq
        await wait_for(lambda: handled, "the replayed event handled")
        assert handled == [event.id]  # the event itself, with its own id
        assert await list_dead_letters(bus) == []
        with pytest.raises(NoSuchDeadLetter):
            await replay(bus, letter.seq)
        code, _, err = await run_cli_async("deadletters", "--replay", str(letter.seq), env=env)
        assert code == 1 and f"no dead letter #{letter.seq}" in err
    finally:
        stop.set()
        await task
