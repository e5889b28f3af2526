"""The demo's material (a sample of the training split, questions from the held-out split) and how
it shows and waits for training (`Pace`, `TrainingView`)."""

from __future__ import annotations

import io
import json

import pytest

from flywheel.demo import (
    AFTER_TRAINING_S,
    AFTER_TRAINING_SHARE,
    SAMPLE_DATASET,
    STALL_S,
    STARTUP_S,
    Pace,
    TrainingView,
    held_out_questions,
)
from libs.common.events import TrainingProgress
from libs.common.skills import binary


def _sample() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_sample_is_level_one_training_material_in_the_skills_own_notation():
    rows = _sample()
    # Every distinct problem of 40,000 the skill generates (seed 0), in order: the skill's own
    # answer format, and all of level 1's 727 training problems, each once.
    distinct = {}
    for row in binary.generate(1, 40_000, seed=0):
        distinct.setdefault(row["messages"][0]["content"], {"messages": row["messages"]})
    assert rows == list(distinct.values()) and len(rows) == 727
    for row in rows:
        question, answer = (m["content"] for m in row["messages"])
        assert binary.split_of(question) == "train"
        assert binary.is_correct(binary.expected_from_answer(answer), answer)


def test_the_demo_asks_five_distinct_held_out_questions_that_no_sample_row_contains():
    questions = held_out_questions()
    prompts = {row["messages"][0]["content"] for row in questions}
    assert len(prompts) == 5 and all(binary.split_of(p) == "eval" for p in prompts)
    assert not prompts & {row["messages"][0]["content"] for row in _sample()}
    assert held_out_questions() == questions  # the same five every time


# ---------------------------------------------------------------------------- how long the demo waits


def progress(step: int, total: int = 100, tokens_per_second: float = 5000.0) -> TrainingProgress:
    return TrainingProgress(run_id="ds-r", dataset_id="d", step=step, total_steps=total, global_step=step, loss=0.5,
                            learning_rate=1e-3, tokens_per_second=tokens_per_second)


def test_the_pace_measures_tokens_per_second_over_the_budget_and_gives_the_eta():
    pace = Pace(now=0.0, budget_tokens=1_000_000)  # 100 steps of 10,000 tokens
    pace.accepted(10.0)
    pace.progress(progress(10), 20.0)
    assert pace.eta_s() is None  # one event is no speed yet
    pace.progress(progress(30), 40.0)  # 20 steps in 20 s
    assert pace.tokens_per_second == pytest.approx(10_000)
    assert pace.eta_s() == pytest.approx(70.0)
    # The speed follows the recent window: slower now, a later ETA.
    for t in range(50, 200, 10):
        pace.progress(progress(30 + (t - 40) // 10), float(t))
    assert pace.tokens_per_second == pytest.approx(1_000)
    assert pace.eta_s() == pytest.approx((100 - 45) * 10)


def test_a_slow_run_is_waited_for_and_a_stuck_one_fails_with_what_it_waited_for():
    pace = Pace(now=0.0, budget_tokens=1_000_000)
    assert pace.overdue(STARTUP_S - 1) is None
    assert "sample not accepted, within" in pace.overdue(STARTUP_S + 1)
    pace.accepted(100.0)
    assert pace.overdue(100 + STALL_S - 1) is None  # the model loads, the first step comes
    assert "no training.progress event for 120s (none since the dataset was accepted" in pace.overdue(100 + STALL_S + 1)
    # Slow but steady (a step every 20 s: 33 minutes for the run) is waited for, past any fixed deadline.
    for step in range(1, 40):
        now = 100.0 + 20 * step
        pace.progress(progress(step), now)
        assert pace.overdue(now + 19) is None
    assert "training is stuck" in pace.overdue(now + STALL_S + 1) and "step 39/100" in pace.overdue(now + STALL_S + 1)
    # Once trained, scoring and deployment get a fixed allowance plus a share of the training time.
    for step in range(40, 101):
        pace.progress(progress(step), now := now + 20)
    assert pace.phase == "trained" and pace.after_training_s == AFTER_TRAINING_S + AFTER_TRAINING_SHARE * (now - 100)
    assert pace.overdue(now + pace.after_training_s - 1) is None
    assert "no deployment answered" in pace.overdue(now + pace.after_training_s + 1)


def test_a_run_too_slow_to_finish_in_reasonable_time_fails_early_with_its_speed():
    pace = Pace(now=0.0, budget_tokens=10_000_000)
    pace.accepted(0.0)
    for t in range(10, 200, 10):  # a step a minute of 10,000 steps
        pace.progress(progress(t // 60, total=10_000), float(t))
    reason = pace.overdue(200.0)
    assert reason and "training too slow" in reason and "tokens/s" in reason and "holding the cores" in reason


def test_a_run_that_finishes_without_progress_events_is_trained_not_stuck():
    pace = Pace(now=0.0, budget_tokens=1_000_000)
    pace.accepted(10.0)
    pace.finished(20.0)  # training.finished of a run resumed at its final checkpoint
    assert pace.phase == "trained" and pace.overdue(20.0 + STALL_S + 1) is None


def test_training_progress_prints_plain_lines_when_not_on_a_terminal():
    out = io.StringIO()
    view, pace = TrainingView(out, every_s=30.0), Pace(now=0.0, budget_tokens=1_000_000)
    for step, now in [(10, 10.0), (20, 20.0), (40, 40.0), (60, 60.0), (100, 70.0)]:
        pace.progress(progress(step), now)
        view.show(pace, progress(step), now)
    lines = out.getvalue().splitlines()
    # The first event, one 30 s later, and the last step.
    assert [line.split(" (")[0] for line in lines] == ["[demo] training  10%", "[demo] training  40%",
                                                       "[demo] training 100%"]
    assert "step 40/100" in lines[1] and "k tok/s" in lines[1] and "ETA 1m00s" in lines[1]
