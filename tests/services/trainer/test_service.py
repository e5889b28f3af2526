"""Integration: the trainer's wiring against a real nats-server, training the tiny model.

Datasets go in as dataset.accepted events (their artifacts written here the way the
gatekeeper writes them); what comes out is read from the bus: training.*, checkpoint.saved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from libs.common import topology
from libs.common.artifacts import ArtifactStore, sha256_dir
from libs.common.bus import REASON_HEADER, Bus
from libs.common.events import AnyEvent, ControlReply, ControlTraining, DatasetAccepted
from libs.common.models import load_model
from libs.common.records import TRAINER_CONTROL, trainer_state
from libs.common.tracing import (
    current_trace_id,
    setup_tracing,
    trace_id_from_headers,
    tracer,
)
from services.trainer.service import SERVICE, TrainerService, model_identity
from services.trainer.state import STATE_FILE, PendingRun, TrainerState, save_state, with_pending
from tests.conftest import wait_for
from tests.services.conftest import running
from tests.services.trainer.samples import chat_rows, write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Recorder:
    """Every trainer event seen on the bus, with its headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict, object]] = []

    async def attach(self, bus: Bus) -> None:
        async def on_msg(msg) -> None:
            self.seen.append((msg.subject, dict(msg.headers or {}), msgspec.json.decode(msg.data, type=AnyEvent)))

        for subject in ("training.>", "checkpoint.>"):
            await bus.nc.subscribe(subject, cb=on_msg)

    def events(self, subject: str, **match) -> list:
        return [e for s, _, e in self.seen if s == subject and all(getattr(e, k) == v for k, v in match.items())]

    async def wait_for(self, subject: str, count: int = 1, timeout: float = 60.0, **match) -> list:
        await until(lambda: len(self.events(subject, **match)) >= count, timeout, f"{count} x {subject} {match}")
        return self.events(subject, **match)


async def until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    await wait_for(condition, what, timeout=timeout)


@contextlib.asynccontextmanager
async def running_trainer(nats_url: str, settings):
    """The service as `python -m services.trainer` starts it, in this process, until the block ends."""
    async with running(SERVICE, msgspec.structs.replace(settings, nats_url=nats_url)) as service:
        yield service


@pytest.fixture
async def recorder(bus: Bus) -> Recorder:
    rec = Recorder()
    await rec.attach(bus)
    return rec


async def publish(bus: Bus, event: DatasetAccepted) -> None:
    await bus.publish(topology.dataset_accepted(event.priority), event)


async def _none_pending(bus: Bus) -> bool:
    return await pending(bus) == 0


async def kv_state(bus: Bus, settings) -> TrainerState:
    """The trainer's state record of the settings' base model, as it is in KV now."""
    state, _ = await (await bus.record(trainer_state(model_identity(Path(settings.base_model))))).read()
    return state or TrainerState()


async def pending(bus: Bus) -> int:
    """Messages the trainer has not acked yet, over its three durables."""
    total = 0
    for spec in topology.TRAINER:
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        total += info.num_pending + info.num_ack_pending
    return total


async def control(bus: Bus, action: str, reason: str = "") -> ControlReply:
    """A control command over NATS, as `flywheel <action>` sends it."""
    request = ControlTraining(action=action, requested_by="test", reason=reason)
    return await bus.request(f"{topology.CONTROL_TRAINER}.{action}", request, ControlReply)


async def paused_at_gate(trainer: TrainerService) -> int:
    """Wait until the run is held at the gate; the step it is held at."""
    await until(lambda: trainer.snapshot()["state"] == "paused", what="paused at the gate")
    return trainer.snapshot()["run"]["step"]


async def test_dataset_becomes_checkpoints_in_one_trace(bus, recorder, nats_server, make_settings, data_dir):
    setup_tracing("test", None)
    settings = make_settings(epochs=2, save_every_steps=3)
    event = write_dataset(data_dir, chat_rows(16))  # 4 steps per epoch, 8 in all
    async with running_trainer(nats_server, settings) as trainer:
        with tracer().start_as_current_span("submit"):
            trace_id = current_trace_id()
            await publish(bus, event)
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED)
        # training.finished goes out before the trained weights are recorded (publish before recording).
        await until(lambda: trainer.snapshot()["state"] == "idle"
                    and trainer.snapshot()["current_weights"] == finished.checkpoint_uri)
        status = trainer.snapshot()

    saved = recorder.events(topology.CHECKPOINT_SAVED)
    assert [(e.step, e.final) for e in saved] == [(3, False), (6, False), (8, True)]
    assert [trace_id_from_headers(h) for s, h, _ in recorder.seen if s == topology.CHECKPOINT_SAVED] == [trace_id] * 3
    assert finished.checkpoint_uri == saved[-1].uri and finished.global_step == 8
    # The real tokens it trained: 8 steps of chat rows, each of them tens of tokens.
    assert 8 * 4 * 10 < finished.tokens < 8 * 4 * 256
    store = ArtifactStore(data_dir / "artifacts")
    checkpoint = store.verify(saved[-1].uri, saved[-1].sha256)
    assert checkpoint.parent.name == finished.run_id and checkpoint.name == "step-00000008"
    assert load_model(checkpoint).config.model_type == "qwen3"
    progress = recorder.events(topology.TRAINING_PROGRESS)
    assert progress and all(p.tokens_per_second > 0 and p.loss > 0 for p in progress)
    [started] = recorder.events(topology.TRAINING_STARTED)
    # The base model is named by its content: the same run id on any host.
    assert started.init_weights == f"base-model:{sha256_dir(Path(settings.base_model))[:16]}" and started.total_steps == 8

    state = await kv_state(bus, settings)
    assert state.current_weights == saved[-1].uri and state.finished == {event.dataset_id: saved[-1].uri}
    assert status["current_weights"] == saved[-1].uri and status["run"]["step"] == 8
    assert await pending(bus) == 0


async def test_high_priority_datasets_are_trained_first_and_each_continues_from_the_last(
    bus, recorder, nats_server, make_settings, data_dir,
):
    events = {
        p: write_dataset(data_dir, chat_rows(4, seed=i), name=p, priority=p)
        for i, p in enumerate(("low", "normal", "high"))
    }
    for event in events.values():
        await publish(bus, event)
    async with running_trainer(nats_server, make_settings()):
        await recorder.wait_for(topology.TRAINING_FINISHED, count=3)
    started = recorder.events(topology.TRAINING_STARTED)
    finished = recorder.events(topology.TRAINING_FINISHED)
    order = {e.dataset_id: p for p, e in events.items()}
    assert [order[e.dataset_id] for e in started] == ["high", "normal", "low"]
    assert started[1].init_weights == finished[0].checkpoint_uri
    assert started[2].init_weights == finished[1].checkpoint_uri
    # 4 rows a step; the 2nd and 3rd runs also replay 2 rows of the datasets before them (30 %).
    assert [e.global_step for e in finished] == [1, 3, 5]


async def test_a_dataset_already_trained_is_acked_without_training_again(
    bus, recorder, nats_server, make_settings, data_dir,
):
    event = write_dataset(data_dir, chat_rows(4))
    async with running_trainer(nats_server, make_settings()):
        await publish(bus, event)
        await recorder.wait_for(topology.TRAINING_FINISHED)
        # The same dataset accepted again (a new submission of the same content): a new event id.
        await publish(bus, msgspec.structs.replace(event, id="again", submission_id="sub-2"))
        await wait_for(lambda: _none_pending(bus), "the second acceptance to be acked")
    assert len(recorder.events(topology.TRAINING_STARTED)) == 1


async def test_pause_resume_and_stop_over_nats_and_a_restart_honours_stop(
    bus, recorder, nats_server, make_settings, data_dir,
):
    settings = make_settings(batch_size=2, epochs=2, progress_every_steps=1)
    event = write_dataset(data_dir, chat_rows(12))  # 12 steps

    async def command(action: str) -> ControlReply:
        request = ControlTraining(action=action, requested_by="test")
        return await bus.request(f"{topology.CONTROL_TRAINER}.{action}", request, ControlReply)

    async def held_at_gate(trainer: TrainerService) -> int:
        await until(lambda: trainer.snapshot()["state"] == "paused", what="paused")
        return trainer.snapshot()["run"]["step"]

    async with running_trainer(nats_server, settings) as trainer:
        await publish(bus, event)
        await recorder.wait_for(topology.TRAINING_PROGRESS)
        reply = await command("pause")
        assert reply.ok and reply.state in ("pausing", "paused")
        step = await held_at_gate(trainer)
        await recorder.wait_for(topology.TRAINING_PROGRESS, step=step)  # in flight before the gate
        seen = len(recorder.seen)
        await asyncio.sleep(1.0)
        assert len(recorder.seen) == seen and trainer.snapshot()["run"]["step"] == step  # held, lease kept
        assert await pending(bus) == 1

        assert (await command("resume")).ok
        await recorder.wait_for(topology.TRAINING_PROGRESS, step=step + 1)
        assert (await command("pause")).ok
        step = await held_at_gate(trainer)

        reply = await command("stop")
        assert reply.ok and reply.state == "stopping"
        [saved] = await recorder.wait_for(topology.CHECKPOINT_SAVED)
        assert not saved.final and saved.step == step
        await until(lambda: trainer.snapshot()["state"] == "stopped", what="stopped")
        assert not (await command("pause")).ok
        assert (await (await bus.record(TRAINER_CONTROL)).read())[0].mode == "stopped"

    # A restarted trainer honours the stop: it takes no work until resumed.
    async with running_trainer(nats_server, settings) as trainer:
        await asyncio.sleep(1.0)
        assert trainer.snapshot()["state"] == "stopped" and len(recorder.events(topology.TRAINING_STARTED)) == 1
        assert (await command("resume")).ok
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED)
    started = recorder.events(topology.TRAINING_STARTED)
    assert [s.start_step for s in started] == [0, saved.step] and started[0].run_id == started[1].run_id
    assert finished.global_step == 12
    assert not recorder.events(topology.TRAINING_FAILED)


async def test_shutdown_checkpoints_and_the_next_trainer_resumes(bus, recorder, nats_server, make_settings, data_dir):
    settings = make_settings(batch_size=2, progress_every_steps=1)
    event = write_dataset(data_dir, chat_rows(60))  # about 30 steps (the recipe may hold a few rows out)
    async with running_trainer(nats_server, settings):
        await publish(bus, event)
        [first] = await recorder.wait_for(topology.TRAINING_STARTED)
        await recorder.wait_for(topology.TRAINING_PROGRESS, count=3)
    # Leaving the block is SIGTERM: stop set, run checkpointed, message released.
    [saved] = recorder.events(topology.CHECKPOINT_SAVED)
    assert not saved.final and 3 <= saved.step < first.total_steps
    state = await kv_state(bus, settings)
    assert state.finished == {} and state.pending.run_id == saved.run_id  # it resumes before any other
    async with running_trainer(nats_server, settings):
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED)
    assert [s.start_step for s in recorder.events(topology.TRAINING_STARTED)] == [0, saved.step]
    assert finished.global_step == first.total_steps


async def test_a_dataset_whose_hash_does_not_match_is_dead_lettered(
    bus, recorder, nats_server, make_settings, data_dir,
):
    event = msgspec.structs.replace(write_dataset(data_dir, chat_rows(4)), sha256="0" * 64)
    dead = await bus.nc.subscribe(topology.dead_letter(topology.dataset_accepted("normal")))
    async with running_trainer(nats_server, make_settings()):
        await publish(bus, event)
        [failed] = await recorder.wait_for(topology.TRAINING_FAILED)
        msg = await dead.next_msg(timeout=10)
    assert not failed.will_retry and "does not match" in failed.error
    assert msgspec.json.decode(msg.data, type=DatasetAccepted).dataset_id == event.dataset_id
    assert not recorder.events(topology.TRAINING_STARTED)


async def test_a_completion_dataset_trains_and_is_replayed_as_text(bus, recorder, nats_server, make_settings, data_dir):
    texts = [{"text": f"{row['messages'][0]['content']} {row['messages'][1]['content']}"} for row in chat_rows(8)]
    completion = write_dataset(data_dir, texts, name="texts", schema="completion_v1")
    chats = write_dataset(data_dir, chat_rows(8, seed=1), name="chats")
    settings = make_settings(replay_fraction=0.5)
    async with running_trainer(nats_server, settings):
        await publish(bus, completion)
        await recorder.wait_for(topology.TRAINING_FINISHED, dataset_id=completion.dataset_id)
        await publish(bus, chats)  # replays the completion rows, read as text
        await recorder.wait_for(topology.TRAINING_FINISHED, dataset_id=chats.dataset_id)
    assert not recorder.events(topology.TRAINING_FAILED)
    first, second = recorder.events(topology.TRAINING_STARTED)
    assert (first.num_examples, first.num_rows_dropped, second.num_replayed) == (8, 0, 8)
    state = await kv_state(bus, settings)
    assert [(d.dataset_id, d.schema) for d in state.trained] == [(completion.dataset_id, "completion_v1"),
                                                                 (chats.dataset_id, "chat_sft_v1")]


async def test_a_dataset_with_no_row_left_to_train_is_dead_lettered_with_the_reasons(
    bus, recorder, nats_server, make_settings, data_dir,
):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    event = write_dataset(data_dir, [long_prompt] * 2)
    dead = await bus.nc.subscribe(topology.dead_letter(topology.dataset_accepted("normal")))
    async with running_trainer(nats_server, make_settings()):
        await publish(bus, event)
        [failed] = await recorder.wait_for(topology.TRAINING_FAILED)
        msg = await dead.next_msg(timeout=10)
    assert not failed.will_retry
    reason = "none of 2 rows can be trained on: 2 rows (1, 2): no assistant token within max_length=128"
    assert reason in failed.error and reason in msg.headers[REASON_HEADER]
    assert msgspec.json.decode(msg.data, type=DatasetAccepted).dataset_id == event.dataset_id
    assert not recorder.events(topology.TRAINING_STARTED)


async def test_http_routes_control_the_same_state(bus, nats_server, make_settings):
    async with running_trainer(nats_server, make_settings()) as trainer:
        app = FastAPI()
        app.include_router(SERVICE.routes(trainer))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/status")).json()["state"] == "idle"
            response = await http.post("/pause")
            assert response.status_code == 200 and response.json()["state"] == "paused"
            assert (await http.post("/stop")).json()["state"] == "stopped"
            refused = await http.post("/pause")
            assert refused.status_code == 409 and not refused.json()["ok"]
            # Found by tests/fuzz: a refusal carries the error shape's `detail` like every other 4xx.
            assert refused.json()["detail"] == refused.json()["message"] == "trainer is stopped; resume it first"
            nothing = await http.post("/skip", json={"reason": "stale data"})
            assert nothing.status_code == 409 and nothing.json()["message"] == "nothing is training; nothing to skip"
            assert (await http.post("/resume")).json()["state"] == "idle"
            status = (await http.get("/status")).json()
    assert status["mode"] == "running" and status["current_weights"].startswith("base-model:")
    assert status["run"]["active"] is False and status["datasets_finished"] == 0


async def test_an_interrupted_run_resumes_before_a_dataset_that_arrived_meanwhile(
    bus, recorder, nats_server, make_settings, data_dir,
):
    # The interrupted dataset is low priority and the newcomer high: by priority alone the
    # newcomer would train first, change the weights, and the interrupted dataset would start
    # over from step 0 as a new run.
    settings = make_settings(batch_size=2, epochs=2, progress_every_steps=1)
    interrupted = write_dataset(data_dir, chat_rows(12), name="interrupted", priority="low")  # 12 steps
    newcomer = write_dataset(data_dir, chat_rows(4, seed=7), name="newcomer", priority="high")
    async with running_trainer(nats_server, settings) as trainer:
        await publish(bus, interrupted)
        await recorder.wait_for(topology.TRAINING_PROGRESS)
        assert (await control(bus, "pause")).ok
        await paused_at_gate(trainer)
        assert (await control(bus, "stop")).ok
        [saved] = await recorder.wait_for(topology.CHECKPOINT_SAVED)
        await until(lambda: trainer.snapshot()["state"] == "stopped", what="stopped")
        pending = trainer.snapshot()["pending_run"]
        assert pending["dataset_id"] == interrupted.dataset_id and pending["run_id"] == saved.run_id

        await publish(bus, newcomer)
        assert (await control(bus, "resume")).ok
        await recorder.wait_for(topology.TRAINING_FINISHED, count=2)

    started = recorder.events(topology.TRAINING_STARTED)
    finished = recorder.events(topology.TRAINING_FINISHED)
    assert [s.dataset_id for s in started] == [interrupted.dataset_id] * 2 + [newcomer.dataset_id]
    assert started[1].run_id == started[0].run_id == saved.run_id
    assert started[1].start_step == saved.step > 0
    assert [f.dataset_id for f in finished] == [interrupted.dataset_id, newcomer.dataset_id]
    assert started[2].init_weights == finished[0].checkpoint_uri  # the newcomer trains on top
    assert not recorder.events(topology.TRAINING_FAILED)
    state = await kv_state(bus, settings)
    assert state.pending is None and set(state.finished) == {interrupted.dataset_id, newcomer.dataset_id}
    await wait_for(lambda: _none_pending(bus), "both datasets' messages to be acked")


async def test_a_pending_run_whose_message_is_gone_is_given_up_not_waited_for(
    bus, recorder, nats_server, make_settings, data_dir,
):
    # The pending run's dataset message is no longer in the stream (expired, purged): waiting
    # for its redelivery would hold every other dataset back forever. The record comes from a
    # state file of the version before KV: migrated at start, the file renamed aside.
    gone = PendingRun(dataset_id="0" * 64, run_id="ds-000000000000-deadbeef", init_weights="file:///base",
                      consumer="trainer-normal", stream_sequence=10_000)
    state_path = data_dir / "trainer" / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    save_state(state_path, with_pending(TrainerState(), gone))
    event = write_dataset(data_dir, chat_rows(4))
    settings = make_settings()
    async with running_trainer(nats_server, settings) as trainer:
        assert trainer.snapshot()["pending_run"]["run_id"] == gone.run_id
        assert not state_path.exists() and state_path.with_name("state.json.migrated").exists()
        await publish(bus, event)
        [finished] = await recorder.wait_for(topology.TRAINING_FINISHED)
    assert finished.dataset_id == event.dataset_id
    assert (await kv_state(bus, settings)).pending is None


async def test_a_pending_record_naming_a_trained_dataset_is_cleared_at_start(bus, nats_server, make_settings, data_dir):
    state_path = data_dir / "trainer" / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    done = PendingRun(dataset_id="d" * 64, run_id="ds-dddddddddddd-00000000", init_weights="file:///base",
                      consumer="trainer-normal", stream_sequence=1)
    save_state(state_path, with_pending(TrainerState(finished={done.dataset_id: "file:///final"}), done))
    settings = make_settings()
    async with running_trainer(nats_server, settings) as trainer:
        assert trainer.snapshot()["pending_run"] is None
    state = await kv_state(bus, settings)
    assert state.pending is None and state.finished == {done.dataset_id: "file:///final"}


async def test_skip_gives_the_dataset_up_with_who_and_why_and_never_records_it_as_trained(
    bus, recorder, nats_server, make_settings, data_dir,
):
    settings = make_settings(batch_size=2, epochs=2, progress_every_steps=1)
    event = write_dataset(data_dir, chat_rows(12))
    async with running_trainer(nats_server, settings) as trainer:
        idle = await control(bus, "skip", reason="wrong labels")
        assert not idle.ok and idle.message == "nothing is training; nothing to skip"
        await publish(bus, event)
        await recorder.wait_for(topology.TRAINING_PROGRESS)
        assert (await control(bus, "pause")).ok
        step = await paused_at_gate(trainer)  # a paused run can be skipped too
        unexplained = await control(bus, "skip")
        assert not unexplained.ok and unexplained.message == "a skip needs a reason"

        reply = await control(bus, "skip", reason="wrong labels")
        assert reply.ok and event.dataset_id in reply.message
        [failed] = await recorder.wait_for(topology.TRAINING_FAILED)
        await wait_for(lambda: _none_pending(bus), "the skipped dataset's message to be acked")
        await until(lambda: trainer.snapshot()["state"] == "paused" and not trainer.snapshot()["run"]["active"],
                    what="the run to end")
        snapshot = trainer.snapshot()

    assert not failed.will_retry and failed.dataset_id == event.dataset_id
    assert failed.error == f"skipped by test at step {step}: wrong labels"
    assert not recorder.events(topology.TRAINING_FINISHED)
    state = await kv_state(bus, settings)
    assert state.finished == {} and state.current_weights == "" and state.pending is None
    assert snapshot["pending_run"] is None and snapshot["datasets_finished"] == 0
