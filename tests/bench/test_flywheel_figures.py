"""The figures of `python -m bench.flywheel` from hand-made records: levels gained, promotions inside
the noise, champion drops, the champion's level-1 accuracy, the targets; and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.flywheel_figures import (
    Evaluation,
    LevelAccuracy,
    LevelChange,
    Promotion,
    champion_accuracy,
    check_promotions,
    levels_gained,
    summarise,
)
from libs.common.events import encode_outcomes

ITEMS = 40


def evaluation(sha: str, correct: set[int] | None, *, t: float = 0.0, low: float = 0.0, high: float = 1.0,
               level1: float = 0.5, suite: str = "s1") -> Evaluation:
    """A score of checkpoint `sha`: items `correct` right out of ITEMS (None: no per-item outcomes)."""
    right = len(correct) if correct is not None else 0
    return Evaluation(
        t=t, run_id=f"run-{sha}", step=10, checkpoint_sha256=sha, suite_version=suite,
        exact_match=right / ITEMS, exact_match_low=low, exact_match_high=high, val_loss=1.0,
        levels={"binary/1": LevelAccuracy(accuracy=level1, low=0.0, high=1.0)},
        num_examples=ITEMS if correct is not None else 0,
        outcomes=encode_outcomes([i in correct for i in range(ITEMS)]) if correct is not None else "",
    )


def promotion(sha: str, exact_match: float, *, t: float = 0.0) -> Promotion:
    return Promotion(t=t, event_id=f"ev-{sha}", checkpoint_sha256=sha, checkpoint_uri=f"file:///{sha}",
                     run_id=f"run-{sha}", step=10, exact_match=exact_match, val_loss=1.0, reason="")


def change(skill: str, previous: int, level: int) -> LevelChange:
    return LevelChange(t=0.0, skill=skill, previous_level=previous, level=level, accuracy=0.9, reason="")


# ---------------------------------------------------------------------------- levels


def test_levels_gained_counts_each_rise_and_lists_every_practised_skill():
    changes = [change("binary", 1, 2), change("binary", 2, 3), change("syllo", 1, 2)]
    assert levels_gained(changes, ["binary", "syllo"]) == {"binary": 2, "syllo": 1}
    assert levels_gained([], ["binary"]) == {"binary": 0}


# ---------------------------------------------------------------------------- promotions


def test_the_first_champion_is_never_noise_nor_a_drop():
    [check] = check_promotions([promotion("a", 0.0)], [evaluation("a", set())])
    assert check.previous is None and not check.noise and not check.drop


def test_a_promotion_that_wins_the_paired_test_is_beyond_the_noise():
    # The candidate is right on 10 items the champion misses and never the other way: p = 2**-10.
    evaluations = [evaluation("a", set(range(10))), evaluation("b", set(range(20)))]
    checks = check_promotions([promotion("a", 0.25), promotion("b", 0.5)], evaluations)
    test = checks[1].test
    assert (test.better, test.worse, test.items) == (10, 0, ITEMS) and test.p_value == pytest.approx(2**-10)
    assert not checks[1].noise and not checks[1].drop


def test_a_promotion_one_item_ahead_is_noise():
    evaluations = [evaluation("a", set(range(10))), evaluation("b", set(range(11)))]
    checks = check_promotions([promotion("a", 10 / ITEMS), promotion("b", 11 / ITEMS)], evaluations)
    assert checks[1].test.p_value == pytest.approx(0.5) and checks[1].noise


def test_the_paired_test_decides_even_when_the_intervals_overlap():
    # Whole-suite intervals that overlap, a paired win all the same: not noise, but counted as overlapping.
    evaluations = [evaluation("a", set(range(10)), low=0.1, high=0.4),
                   evaluation("b", set(range(20)), low=0.35, high=0.65)]
    checks = check_promotions([promotion("a", 0.25), promotion("b", 0.5)], evaluations)
    assert checks[1].intervals_overlap is True and not checks[1].noise
    summary = summarise(minutes=1, evaluations=evaluations, promotions=[promotion("a", 0.25), promotion("b", 0.5)],
                        changes=[], trainings=[], skills=["binary"])
    assert summary["noise_promotions"] == 0 and summary["overlapping_promotions"] == 1


def test_without_outcomes_the_intervals_decide():
    apart = [evaluation("a", None, low=0.0, high=0.2), evaluation("b", None, low=0.3, high=0.6)]
    overlapping = [evaluation("a", None, low=0.0, high=0.4), evaluation("b", None, low=0.3, high=0.6)]
    promotions = [promotion("a", 0.1), promotion("b", 0.45)]
    assert not check_promotions(promotions, apart)[1].noise
    assert check_promotions(promotions, overlapping)[1].noise


def test_scores_on_different_suites_are_not_compared():
    evaluations = [evaluation("a", set(range(10)), suite="s1", high=0.2),
                   evaluation("b", set(range(30)), suite="s2", low=0.6)]
    [_, check] = check_promotions([promotion("a", 0.25), promotion("b", 0.75)], evaluations)
    assert check.test is None and check.intervals_overlap is None and check.noise


def test_a_champion_worse_than_the_one_before_is_a_drop():
    promotions = [promotion("a", 0.5), promotion("b", 0.4), promotion("c", 0.6)]
    checks = check_promotions(promotions, [])
    assert [c.drop for c in checks] == [False, True, False]


# ---------------------------------------------------------------------------- the summary


def test_level1_accuracy_is_the_last_champions_newest_score():
    evaluations = [evaluation("a", set(), level1=0.5), evaluation("b", set(), level1=0.7),
                   evaluation("b", set(), level1=0.95, t=5.0), evaluation("c", set(), level1=1.0)]
    assert champion_accuracy([promotion("a", 0.0), promotion("b", 0.1)], evaluations) == 0.95
    assert champion_accuracy([], evaluations) is None


def test_the_summary_holds_the_figures_the_targets_and_what_was_met():
    evaluations = [evaluation("a", set(range(10)), level1=0.6), evaluation("b", set(range(30)), level1=0.95)]
    promotions = [promotion("a", 0.25), promotion("b", 0.75)]
    summary = summarise(minutes=30.0, evaluations=evaluations, promotions=promotions,
                        changes=[change("binary", 1, 2), change("binary", 2, 3)], trainings=[], skills=["binary"])
    assert summary["levels_gained"] == {"binary": 2} and summary["level1_accuracy"] == 0.95
    assert (summary["promotions"], summary["noise_promotions"], summary["champion_drops"]) == (2, 0, 0)
    assert summary["targets"]["levels_gained"] == {"binary": 2} and summary["targets"]["minutes"] == 30
    assert summary["met"] == {"levels_gained": True, "level1_accuracy": True, "noise_promotions": True,
                              "champion_drops": True}

    empty = summarise(minutes=1.0, evaluations=[], promotions=[], changes=[], trainings=[], skills=["binary"])
    assert empty["level1_accuracy"] is None and empty["levels_gained"] == {"binary": 0}
    assert empty["met"]["level1_accuracy"] is False and empty["met"]["levels_gained"] is False


def test_the_plot_is_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from bench.flywheel_plot import plot

    evaluations = [evaluation("a", set(range(10)), t=30.0), evaluation("b", set(range(20)), t=90.0)]
    path = plot(tmp_path / "out" / "flywheel.png", minutes=2.0, evaluations=evaluations,
                promotions=[promotion("a", 0.25, t=31.0), promotion("b", 0.5, t=91.0)],
                changes=[LevelChange(t=60.0, skill="binary", previous_level=1, level=2, accuracy=0.9, reason="")])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
