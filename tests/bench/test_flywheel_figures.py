"""The figures of `python -m bench.flywheel` from hand-made records: levels gained, false promotions on
the sealed test, the champion's sealed-test accuracy, tokens to each level, promotions inside the
noise, champion drops, the targets; and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.flywheel_figures import (
    Evaluation,
    LevelAccuracy,
    LevelChange,
    Promotion,
    SealedScore,
    Training,
    champion_accuracy,
    check_promotions,
    check_sealed,
    levels_gained,
    sealed_accuracy,
    summarise,
    tokens_to_level,
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


def change(skill: str, previous: int, level: int, *, t: float = 0.0) -> LevelChange:
    return LevelChange(t=t, skill=skill, previous_level=previous, level=level, accuracy=0.9, reason="")


def sealed(sha: str, correct: set[int], *, suite: str = "t1", level1: float = 0.95, level2: float = 0.85,
           t: float = 0.0) -> SealedScore:
    """A sealed-test score of champion `sha`: items `correct` right out of ITEMS."""
    return SealedScore(
        t=t, checkpoint_sha256=sha, run_id=f"run-{sha}", suite_version=suite, exact_match=len(correct) / ITEMS,
        exact_match_low=0.0, exact_match_high=1.0, num_examples=ITEMS,
        levels={"binary/1": LevelAccuracy(accuracy=level1, low=0.8, high=0.99, correct=19, total=20),
                "binary/2": LevelAccuracy(accuracy=level2, low=0.6, high=0.95, correct=17, total=20)},
        outcomes=encode_outcomes([i in correct for i in range(ITEMS)]),
    )


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


# ---------------------------------------------------------------------------- the sealed test


def test_a_promotion_is_false_when_the_sealed_test_shows_no_gain_over_the_champion_it_replaced():
    promotions = [promotion("a", 0.2), promotion("b", 0.5), promotion("c", 0.6), promotion("d", 0.7)]
    tests = [sealed("a", set(range(10))), sealed("b", set(range(20))),  # b: 10 better, 0 worse
             sealed("c", set(range(5, 25)))]  # c against b: 5 better, 5 worse: no gain; d never tested
    checks = check_sealed(promotions, tests)
    assert [(c.better, c.worse, c.false, c.tested) for c in checks] == [
        (10, 0, False, True), (5, 5, True, True), (None, None, False, False)]
    # Two test versions: compared on one both were scored on, never across.
    assert not check_sealed(promotions[:2], [sealed("a", set(range(10)), suite="t1"),
                                             sealed("b", set(range(20)), suite="t2")])[0].tested


def test_the_final_champions_sealed_accuracy_is_its_newest_test():
    promotions = [promotion("a", 0.2), promotion("b", 0.5)]
    tests = [sealed("b", set(), level1=0.5), sealed("b", set(), level1=0.92, t=9.0), sealed("a", set(), level1=1.0)]
    accuracy = sealed_accuracy(promotions, tests)
    assert accuracy["binary/1"] == {"accuracy": 0.92, "low": 0.8, "high": 0.99, "correct": 19, "total": 20}
    assert sealed_accuracy(promotions, [sealed("a", set())]) is None and sealed_accuracy([], tests) is None


def test_tokens_to_each_level_count_the_runs_finished_before_it():
    trainings = [Training(t=t, run_id=f"r{t}", dataset_id="d", global_step=1, final_loss=1.0, duration_s=1.0,
                          tokens=1000) for t in (10.0, 20.0, 30.0)]
    changes = [change("binary", 1, 2, t=25.0), change("binary", 2, 3, t=60.0)]
    assert [(c["level"], c["tokens"]) for c in tokens_to_level(changes, trainings)] == [(2, 2000), (3, 3000)]


def test_the_summary_holds_the_figures_the_targets_and_what_was_met():
    evaluations = [evaluation("a", set(range(10)), level1=0.6), evaluation("b", set(range(30)), level1=0.95)]
    promotions = [promotion("a", 0.25), promotion("b", 0.75)]
    tests = [sealed("a", set(range(10))), sealed("b", set(range(25)))]
    trainings = [Training(t=0.0, run_id="r", dataset_id="d", global_step=1, final_loss=1.0, duration_s=1.0,
                          tokens=5000)]
    summary = summarise(minutes=30.0, evaluations=evaluations, promotions=promotions,
                        changes=[change("binary", 1, 2), change("binary", 2, 3)], trainings=trainings,
                        skills=["binary"], tests=tests, novelty={"items": 96, "novel": 96, "share": 1.0})
    assert summary["levels_gained"] == {"binary": 2} and summary["level1_accuracy"] == 0.95
    assert (summary["promotions"], summary["noise_promotions"], summary["champion_drops"]) == (2, 0, 0)
    assert (summary["false_promotions"], summary["untested_promotions"], summary["novel_share"]) == (0, 0, 1.0)
    assert summary["test_accuracy"]["binary/2"]["accuracy"] == 0.85 and summary["train_tokens"] == 5000
    assert summary["targets"]["test_accuracy"] == {"binary/1": 0.9, "binary/2": 0.8}
    assert summary["targets"]["minutes"] == 30 and summary["targets"]["false_promotions"] == 0
    assert summary["met"] == {"levels_gained": True, "test_accuracy": True, "false_promotions": True,
                              "novel_share": True}

    # A promotion never tested on the sealed test cannot be shown a gain: the target is not met.
    untested = summarise(minutes=30.0, evaluations=evaluations, promotions=promotions, changes=[], trainings=[],
                         skills=["binary"], tests=tests[:1])
    assert untested["untested_promotions"] == 1 and untested["met"]["false_promotions"] is False

    empty = summarise(minutes=1.0, evaluations=[], promotions=[], changes=[], trainings=[], skills=["binary"])
    assert empty["level1_accuracy"] is None and empty["levels_gained"] == {"binary": 0}
    assert empty["test_accuracy"] is None and empty["novel_share"] is None
    assert not any(empty["met"][key] for key in ("levels_gained", "test_accuracy", "novel_share"))


def test_the_plot_is_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from bench.flywheel_plot import plot

    evaluations = [evaluation("a", set(range(10)), t=30.0), evaluation("b", set(range(20)), t=90.0)]
    path = plot(tmp_path / "out" / "flywheel.png", minutes=2.0, evaluations=evaluations,
                promotions=[promotion("a", 0.25, t=31.0), promotion("b", 0.5, t=91.0)],
                changes=[LevelChange(t=60.0, skill="binary", previous_level=1, level=2, accuracy=0.9, reason="")],
                tests=[sealed("a", set(range(10)), t=40.0)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
