"""The progression rule, judged by champion scores: pure, no bus."""

from __future__ import annotations

from libs.common.events import LevelScore
from libs.common.records import Champion, SkillState
from services.curriculum.progression import SCORES_KEPT, describe, eval_key, progress
from services.curriculum.settings import CurriculumSettings
from tests.services.curriculum.champions import NOW, champion, rolled_back_to


def step(state: SkillState, scored: Champion, *, window: int = 1, max_level: int = 5):
    key = eval_key(scored.checkpoint_sha256, scored.suite_version)
    return progress(state, scored, threshold=0.8, window=window, max_level=max_level, now=NOW, event_id=f"id-{key}")


def test_the_default_judges_by_the_current_champion_alone():
    settings = CurriculumSettings(nats_url="unused")
    assert (settings.window, settings.threshold) == (1, 0.8)


def test_a_champion_at_the_threshold_raises_the_level_and_says_why():
    a = champion("a", {1: 40, 2: 5})
    result = step(SkillState(skill="binary"), a)
    change = result.change
    assert change is not None and result.state.level == 2 and result.state.changes == [change]
    assert (change.previous_level, change.level, change.accuracy) == (1, 2, 40 / 48)
    # Which champion, on which suite, and its score with the interval.
    assert (change.checkpoint_sha256, change.run_id) == (a.checkpoint_sha256, "run-a")
    assert change.suite_version == a.suite_version
    assert change.score == a.levels["binary/1"] and change.eval_key == eval_key(a.checkpoint_sha256, a.suite_version)
    assert "binary/1 40/48 = 0.83 [0.70, 0.91]" in change.reason and "run-a" in change.reason
    assert "level 1 -> 2" in change.reason and change.event_id == f"id-{change.eval_key}"
    assert not change.announced and result.state.recent == []


def test_describe_gives_the_count_the_accuracy_and_the_interval():
    score = LevelScore(correct=38, total=48, accuracy=38 / 48, low=0.6559, high=0.8823)
    assert describe("binary/1", score) == "binary/1 38/48 = 0.79 [0.66, 0.88]"


def test_a_champion_below_the_threshold_keeps_the_level():
    result = step(SkillState(skill="binary"), champion("a", {1: 38}))
    assert result.change is None and result.state.level == 1 and result.state.recent == [38 / 48]
    assert "binary/1 38/48 = 0.79" in result.reason and "1 champion score(s) in a row at >= 0.8" in result.reason


def test_a_window_of_two_needs_two_champion_scores_in_a_row():
    state = SkillState(skill="binary")
    for name, correct in (("a", 45), ("b", 30), ("c", 45)):
        result = step(state, champion(name, {1: correct}), window=2)
        assert result.change is None
        state = result.state
    assert state.recent == [30 / 48, 45 / 48]
    raised = step(state, champion("d", {1: 40}), window=2)  # the window slides past the miss
    assert raised.state.level == 2 and "the 1 champion score(s) before: 0.94" in raised.reason


def test_never_above_max_level():
    state = SkillState(skill="binary", level=3)
    result = step(state, champion("a", {3: 48}), max_level=3)
    assert result.change is None and result.state.level == 3 and "top level" in result.reason


def test_a_champion_score_counts_once_whatever_record_carries_it():
    a = champion("a", {1: 20})
    first = step(SkillState(skill="binary"), a, window=2)
    # The same checkpoint on the same suite again: a redelivery, or a rollback restoring it.
    for again in (a, rolled_back_to(a, champion("b", {1: 48}))):
        result = step(first.state, again, window=2)
        assert result.already_counted and result.state == first.state and result.change is None


def test_a_rescore_on_a_new_suite_is_a_new_score():
    a = champion("a", {1: 30})
    state = step(SkillState(skill="binary"), a).state
    rescored = champion("a", {1: 44}, suite="binary-v2-y")
    result = step(state, rescored)
    assert result.change is not None and result.change.suite_version == "binary-v2-y"
    assert result.state.champion_scores == [eval_key(a.checkpoint_sha256, s) for s in (a.suite_version, "binary-v2-y")]


def test_a_weaker_champion_never_lowers_the_level():
    state = SkillState(skill="binary", level=3)
    weak = champion("w", {1: 2, 2: 1, 3: 0})
    result = step(state, rolled_back_to(weak, champion("s", {3: 48})))
    assert result.change is None and result.state.level == 3 and result.state.recent == [0.0]


def test_one_champion_score_raises_a_level_by_one_at_most():
    result = step(SkillState(skill="binary"), champion("a", {1: 48, 2: 48, 3: 48}))
    assert result.state.level == 2 and len(result.state.changes) == 1


def test_missing_level_score_changes_nothing_but_is_counted():
    a = champion("a", {1: 48})
    result = step(SkillState(skill="binary", level=4), a)
    assert result.change is None and result.state.recent == [] and "no score for binary/4" in result.reason
    assert result.state.champion_scores == [eval_key(a.checkpoint_sha256, a.suite_version)]


def test_counted_scores_are_bounded():
    state = SkillState(skill="binary", champion_scores=[f"old{i}" for i in range(SCORES_KEPT)])
    assert len(step(state, champion("a", {1: 1})).state.champion_scores) == SCORES_KEPT
