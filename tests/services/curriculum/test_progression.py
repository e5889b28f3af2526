"""The progression rule, the idle timer and the synthetic dataset: pure, no bus."""

from __future__ import annotations

from datetime import UTC, datetime

from libs.common.records import SkillState
from services.curriculum.progression import SEEN_KEPT, progress

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def step(state: SkillState, key: str, by_level: dict[str, float], *, window: int = 2, max_level: int = 5):
    return progress(
        state, key, by_level, threshold=0.8, window=window, max_level=max_level, now=NOW, event_id=f"id-{key}"
    )


def test_level_rises_after_window_evaluations_at_threshold():
    state = SkillState(skill="binary")
    first = step(state, "k1", {"binary/1": 0.9, "binary/2": 0.1})
    assert first.change is None and first.state.level == 1 and first.state.recent == [0.9]
    second = step(first.state, "k2", {"binary/1": 0.8})
    assert second.change is not None
    assert (second.change.previous_level, second.change.level, second.change.accuracy) == (1, 2, 0.8)
    assert second.state.level == 2 and second.state.recent == [] and second.state.changes == [second.change]
    assert "level 1 -> 2" in second.reason and second.change.event_id == "id-k2"


def test_one_miss_in_the_window_keeps_the_level():
    state = SkillState(skill="binary")
    for i, accuracy in enumerate([0.9, 0.5, 0.9]):
        result = step(state, f"k{i}", {"binary/1": accuracy})
        assert result.change is None
        state = result.state
    assert state.recent == [0.5, 0.9]
    assert step(state, "k9", {"binary/1": 0.85}).state.level == 2  # the window slides past the miss


def test_window_of_one():
    assert step(SkillState(skill="binary"), "k", {"binary/1": 1.0}, window=1).state.level == 2


def test_never_above_max_level():
    state = SkillState(skill="binary", level=3, recent=[0.95])
    result = step(state, "k", {"binary/3": 1.0}, max_level=3)
    assert result.change is None and result.state.level == 3 and "top level" in result.reason


def test_an_evaluation_counts_once():
    first = step(SkillState(skill="binary"), "k", {"binary/1": 0.9})
    again = step(first.state, "k", {"binary/1": 0.9})
    assert again.already_counted and again.state == first.state and again.change is None


def test_missing_level_score_changes_nothing_but_is_counted():
    result = step(SkillState(skill="binary", level=4), "k", {"binary/1": 1.0})
    assert result.change is None and result.state.recent == [] and "no score for binary/4" in result.reason
    assert result.state.seen == ["k"]


def test_seen_keys_are_bounded():
    state = SkillState(skill="binary", seen=[f"old{i}" for i in range(SEEN_KEPT)])
    assert len(step(state, "new", {"binary/1": 0.1}).state.seen) == SEEN_KEPT
