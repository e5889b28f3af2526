"""The streams read back as history: what `flywheel lineage` and the dashboard are built from."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import context

from libs.common import topology
from libs.common.events import (
    CheckpointSaved,
    DatasetRejected,
    TrainingProgress,
    TrainingStarted,
)
from libs.common.history import Recorded, follow, read_history, read_subject, stream_end
from libs.common.tracing import extract_context
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def _started(run: str) -> TrainingStarted:
    return TrainingStarted(run_id=run, dataset_id="d", init_weights="base", total_steps=4, start_step=0, global_step=0)


def _saved(run: str, step: int) -> CheckpointSaved:
    return CheckpointSaved(run_id=run, step=step, global_step=step, dataset_id="d", uri=f"file:///c/{run}/{step}",
                           sha256="0" * 64, final=True)


async def test_read_subject_returns_what_is_stored_in_order_with_trace_ids(bus) -> None:
    assert await read_subject(bus, topology.TRAINING_STARTED) == []
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    token = context.attach(extract_context({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}))
    try:
        await bus.publish(topology.TRAINING_STARTED, _started("r1"))
    finally:
        context.detach(token)
    await bus.publish(topology.TRAINING_PROGRESS, TrainingProgress(
        run_id="r1", dataset_id="d", step=1, total_steps=4, global_step=1, loss=1.0, learning_rate=1e-3,
        tokens_per_second=10.0))
    await bus.publish(topology.TRAINING_STARTED, _started("r2"))

    found = await read_subject(bus, topology.TRAINING_STARTED)

    assert [r.event.run_id for r in found] == ["r1", "r2"]
    assert found[0].stream == "TRAINING" and found[0].seq < found[1].seq
    assert found[0].subject == topology.TRAINING_STARTED and found[0].stored is not None
    # The trace id comes from the message's traceparent header: the trace the event belongs to.
    assert found[0].trace_id == trace_id != found[1].trace_id


async def test_read_history_merges_subjects_of_several_streams_by_time(bus) -> None:
    await bus.publish(topology.TRAINING_STARTED, _started("r1"))
    await bus.publish(topology.DATASET_REJECTED, DatasetRejected(name="bad", reasons=["no rows"], report_uri="file:///r",
                                                                 submission_id="s1"))
    await bus.publish(topology.CHECKPOINT_SAVED, _saved("r1", 4))

    found = await read_history(bus, [topology.TRAINING_STARTED, topology.CHECKPOINT_SAVED, topology.DATASET_REJECTED])

    assert [type(r.event).__name__ for r in found] == ["TrainingStarted", "DatasetRejected", "CheckpointSaved"]


async def test_a_body_that_is_no_event_is_kept_with_event_none(bus) -> None:
    await bus.js.publish("deadletter.dataset.submitted", b"not json", headers={"Flywheel-Reason": "bad"})

    [found] = await read_subject(bus, "deadletter.>")

    assert found.event is None and found.headers["Flywheel-Reason"] == "bad"


async def test_follow_replays_a_multi_subject_stream_then_delivers_new_messages(bus) -> None:
    await bus.publish(topology.TRAINING_STARTED, _started("r1"))
    await bus.publish(topology.CHECKPOINT_SAVED, _saved("r1", 4))
    seen: list[Recorded] = []
    stop = asyncio.Event()
    task = asyncio.create_task(follow(bus, "TRAINING", seen.append, stop))
    try:
        end = await stream_end(bus, "TRAINING")
        await wait_for(lambda: seen and seen[-1].seq >= end, "the replay of TRAINING")
        await bus.publish(topology.TRAINING_STARTED, _started("r2"))
        await wait_for(lambda: len(seen) == 3, lambda: f"a live message after the replay: {seen}")
    finally:
        stop.set()
        await task

    assert [type(r.event).__name__ for r in seen] == ["TrainingStarted", "CheckpointSaved", "TrainingStarted"]
    assert seen[-1].event.run_id == "r2"
