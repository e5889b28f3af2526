"""Unit: the control state machine (skip included), the gate the training loop passes, status
words and folding."""

from __future__ import annotations

import threading

import pytest

from libs.common.events import CheckpointSaved, TrainingProgress, TrainingStarted
from services.trainer.control import ControlGate, Skip, decide
from services.trainer.status import RunStatus, describe_state
from tests.conftest import wait_for_sync


@pytest.mark.parametrize(("mode", "action", "expected", "ok"), [
    ("running", "pause", "paused", True),
    ("paused", "pause", "paused", True),
    ("stopped", "pause", "stopped", False),
    ("running", "resume", "running", True),
    ("paused", "resume", "running", True),
    ("stopped", "resume", "running", True),
    ("running", "stop", "stopped", True),
    ("paused", "stop", "stopped", True),
    ("stopped", "stop", "stopped", True),
])
def test_decide(mode, action, expected, ok):
    decision = decide(mode, action)
    assert (decision.mode, decision.ok) == (expected, ok)
    assert decision.message


@pytest.mark.parametrize("mode", ["running", "paused", "stopped"])
def test_skip_needs_a_run_and_a_reason_and_changes_no_mode(mode):
    granted = decide(mode, "skip", training=True, reason="bad labels")
    assert (granted.mode, granted.ok) == (mode, True) and "not trained" in granted.message
    idle = decide(mode, "skip", training=False, reason="bad labels")
    assert (idle.mode, idle.ok, idle.message) == (mode, False, "nothing is training; nothing to skip")
    unexplained = decide(mode, "skip", training=True, reason="  ")
    assert (unexplained.ok, unexplained.message) == (False, "a skip needs a reason")


def test_decide_refuses_unknown_actions():
    with pytest.raises(ValueError):
        decide("running", "explode")


def run_in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    return thread, result


def test_gate_lets_a_running_loop_through():
    assert ControlGate().proceed() is True


def test_gate_holds_a_paused_loop_until_resume():
    gate = ControlGate("paused")
    thread, result = run_in_thread(gate.proceed)
    wait_for_sync(lambda: gate.waiting, "the loop to wait at the gate")
    assert thread.is_alive()
    gate.set_mode("running")
    thread.join(2)
    assert result["value"] is True and not gate.waiting


def test_gate_releases_a_paused_loop_to_stop():
    gate = ControlGate("paused")
    thread, result = run_in_thread(gate.proceed)
    wait_for_sync(lambda: gate.waiting, "the loop to wait at the gate")
    gate.set_mode("stopped")
    thread.join(2)
    assert result["value"] is False


def test_gate_shutdown_stops_even_a_paused_loop():
    gate = ControlGate("paused")
    thread, result = run_in_thread(gate.proceed)
    wait_for_sync(lambda: gate.waiting, "the loop to wait at the gate")
    gate.shut_down()
    thread.join(2)
    assert result["value"] is False
    assert ControlGate().proceed() is True and gate.proceed() is False


def test_gate_skip_ends_a_paused_loop_and_says_so():
    gate = ControlGate("paused")
    thread, result = run_in_thread(gate.proceed)
    wait_for_sync(lambda: gate.waiting, "the loop to wait at the gate")
    assert gate.skip_requested is None
    gate.skip(Skip(requested_by="cli", reason="duplicate data"))
    thread.join(2)
    assert result["value"] is False and gate.skip_requested == Skip("cli", "duplicate data")
    assert gate.mode == "paused"  # a skip changes no mode


def test_gate_skip_does_not_carry_over_to_the_next_run():
    gate = ControlGate()
    gate.skip(Skip(requested_by="http", reason="why"))
    assert gate.proceed() is False
    gate.clear_skip()
    assert gate.proceed() is True and gate.skip_requested is None


@pytest.mark.parametrize(("mode", "active", "held", "word"), [
    ("running", False, False, "idle"),
    ("running", True, False, "training"),
    ("paused", True, False, "pausing"),
    ("paused", True, True, "paused"),
    ("paused", False, False, "paused"),
    ("stopped", True, False, "stopping"),
    ("stopped", False, False, "stopped"),
])
def test_describe_state(mode, active, held, word):
    assert describe_state(mode, active, held) == word


def test_describe_state_says_skipping_only_while_a_run_is_skipped():
    assert describe_state("paused", True, True, skipping=True) == "skipping"
    assert describe_state("running", False, False, skipping=True) == "idle"


def test_run_status_folds_events():
    status = RunStatus()
    status.observe(TrainingStarted(run_id="r", dataset_id="d", init_weights="w", total_steps=10, start_step=4,
                                   global_step=24, num_rows_dropped=2, dropped_reasons=["2 rows (1, 3): why"]))
    assert (status.run_id, status.step, status.total_steps, status.global_step) == ("r", 4, 10, 24)
    assert status.as_dict()["num_rows_dropped"] == 2 and status.dropped_reasons == ["2 rows (1, 3): why"]
    status.observe(TrainingProgress(run_id="r", dataset_id="d", step=6, total_steps=10, global_step=26,
                                    loss=1.5, learning_rate=1e-3, tokens_per_second=900.0))
    assert (status.step, status.last_loss, status.tokens_per_second) == (6, 1.5, 900.0)
    status.observe(CheckpointSaved(run_id="r", step=6, global_step=26, dataset_id="d", uri="file:///c", sha256="s",
                                   final=False))
    assert status.as_dict()["last_checkpoint"] == "file:///c"
