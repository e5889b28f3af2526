"""The suites: every skill's levels, deterministic, versioned by content, fixed once saved; the sealed
test suite beside the selection suite shares no problem with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.events import ChampionTested
from libs.common.settings import load_settings
from libs.common.skills import SKILLS, binary, syllo
from services.evaluator import suite as suite_module
from services.evaluator.scorebook import ChampionTestRecord, Scorebook
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import (
    Suite,
    build_suite,
    build_test_suite,
    load_or_create_suite,
    load_or_create_test_suite,
)

BOTH = {"binary": 3, "syllo": 2}


def test_suite_is_deterministic_and_versioned_by_content():
    first, again = build_suite(BOTH, 16, seed=7), build_suite(BOTH, 16, seed=7)
    assert first == again
    assert first.version.startswith("skills-v2-") and len(first.items) == 5 * 16
    assert build_suite(BOTH, 16, seed=8).version != first.version
    assert build_suite({"binary": 2, "syllo": 2}, 16, seed=7).version != first.version
    assert build_suite({"binary": 3, "syllo": 1}, 16, seed=7).version != first.version


def test_suite_holds_every_skills_levels_with_its_own_kind_of_expected_answer():
    suite = build_suite(BOTH, 4, seed=7)
    assert suite.levels() == {"binary": [1, 2, 3], "syllo": [1, 2]}
    keys = [item.level_key for item in suite.items]
    assert [keys.count(k) for k in ("binary/1", "binary/2", "binary/3", "syllo/1", "syllo/2")] == [4] * 5
    for item in suite.items:
        if item.skill == "binary":
            assert isinstance(item.expected, str)
        else:
            assert isinstance(item.expected, list) and all(isinstance(w, str) for w in item.expected)
        # Each item's gold answer is right by its own skill's scorer.
        assert SKILLS[item.skill].is_correct(item.expected, item.messages[-1].content)


def test_a_skill_at_level_0_is_left_out_and_an_empty_or_unknown_suite_is_refused():
    assert build_suite({"binary": 2, "syllo": 0}, 2, seed=1).levels() == {"binary": [1, 2]}
    assert build_suite({"binary": 0, "syllo": 1}, 2, seed=1).levels() == {"syllo": [1]}
    for bad in ({"binary": 0, "syllo": 0}, {"binary": 1}, {"binary": 1, "syllo": 1, "chess": 1},
                {"binary": binary.MAX_LEVEL + 1, "syllo": 1}, {"binary": 1, "syllo": syllo.MAX_LEVEL + 1}):
        with pytest.raises(ValueError):
            build_suite(bad, 2, seed=0)


def test_suite_items_are_held_out_from_training_data():
    suite = build_suite({"binary": binary.MAX_LEVEL, "syllo": syllo.MAX_LEVEL}, 16, seed=1)
    prompts = {item.messages[0].content for item in suite.items}
    assert all(SKILLS[item.skill].split_of(item.messages[0].content) == "eval" for item in suite.items)
    training = {
        r["messages"][0]["content"]
        for name, top in (("binary", binary.MAX_LEVEL), ("syllo", syllo.MAX_LEVEL))
        for level in range(1, top + 1) for s in range(3) for r in SKILLS[name].generate(level, 200, s)
    }
    assert not prompts & training


def test_the_default_settings_build_a_feasible_suite():
    """Every level of every skill holds enough distinct eval problems for the default items_per_level."""
    settings = load_settings(EvaluatorSettings, "evaluator", environ={})
    assert set(settings.suite_max_levels) == set(SKILLS)
    assert settings.items_per_level >= 40
    suite = build_suite(settings.suite_max_levels, settings.items_per_level, settings.suite_seed)
    counts = {}
    for item in suite.items:
        counts[item.level_key] = counts.get(item.level_key, 0) + 1
    expected_keys = {f"{name}/{level}" for name, top in settings.suite_max_levels.items() for level in range(1, top + 1)}
    assert set(counts) == expected_keys and {"binary/1", "syllo/1"} <= expected_keys
    assert set(counts.values()) == {settings.items_per_level}
    for key in counts:  # distinct problems within a level (two levels' ranges may overlap)
        prompts = [item.messages[0].content for item in suite.items if item.level_key == key]
        assert len(set(prompts)) == len(prompts), key
    # Every level also holds as many more for the sealed test, none of them a suite problem.
    assert settings.test_seed != settings.suite_seed
    test = build_test_suite(suite, settings.test_seed)
    assert len(test.items) == len(suite.items) and not keys(test) & keys(suite)


def test_a_level_without_enough_distinct_problems_is_refused():
    # Binary level 1 holds about 128 distinct eval problems.
    with pytest.raises(ValueError, match="too few distinct eval problems"):
        build_suite({"binary": 1, "syllo": 0}, 400, seed=0)


def test_saved_suite_is_reused_even_if_the_generator_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    saved = load_or_create_suite(tmp_path, BOTH, 2, seed=5)
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    monkeypatch.setattr(suite_module, "build_suite", lambda *a: pytest.fail("must not regenerate"))
    again = load_or_create_suite(tmp_path, BOTH, 2, seed=5)
    assert again == saved
    # SYLLO's list answers come back as lists.
    assert any(isinstance(item.expected, list) for item in again.items)


# ---------------------------------------------------------------------------- the sealed test suite


def keys(suite: Suite) -> set[tuple[str, str]]:
    """What each of the suite's problems is, by its skill's own `problem_key`."""
    return {(item.skill, SKILLS[item.skill].problem_key(item.messages[0].content)) for item in suite.items}


def per_level(suite: Suite) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in suite.items:
        counts[item.level_key] = counts.get(item.level_key, 0) + 1
    return counts


@pytest.mark.parametrize("test_seed", [11, 7])  # 7: the selection suite's own seed
def test_the_test_suite_holds_fresh_eval_problems_at_the_same_levels_and_none_of_the_selection_suite(test_seed):
    selection = build_suite(BOTH, 16, seed=7)
    test = build_test_suite(selection, test_seed)
    assert test.name == "skills-test" and test.version.startswith("skills-test-v2-")
    assert test.levels() == selection.levels() and per_level(test) == per_level(selection)
    assert all(SKILLS[item.skill].split_of(item.messages[0].content) == "eval" for item in test.items)
    # No problem twice within the test suite, and none of the selection suite's.
    assert len(keys(test)) == len(test.items)
    assert not keys(test) & keys(selection)
    assert not suite_module.shared_problems(test, selection)
    for item in test.items:
        assert SKILLS[item.skill].is_correct(item.expected, item.messages[-1].content)


def test_the_test_suite_is_deterministic_and_its_version_changes_with_its_seed():
    selection = build_suite(BOTH, 8, seed=7)
    first = build_test_suite(selection, 11)
    assert build_test_suite(selection, 11) == first
    assert build_test_suite(selection, 12).version != first.version
    assert first.version != selection.version


def test_a_new_test_seed_rolls_out_a_new_test_version_and_the_old_scores_stay_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
):
    selection = load_or_create_suite(tmp_path, BOTH, 2, seed=5)
    first = load_or_create_test_suite(tmp_path, selection, seed=11)
    assert len(list(tmp_path.glob("skills-test-*.jsonl"))) == 1
    testbook = Scorebook(tmp_path / "test-scores", ChampionTestRecord)
    old = ChampionTestRecord(event=champion_tested(first.version), items=[], published=True)
    testbook.save(old)

    with monkeypatch.context() as patched:
        patched.setattr(suite_module, "build_test_suite", lambda *a: pytest.fail("must not regenerate"))
        assert load_or_create_test_suite(tmp_path, selection, seed=11) == first  # written once, read back

    second = load_or_create_test_suite(tmp_path, selection, seed=12)
    assert second.version != first.version and len(list(tmp_path.glob("skills-test-*.jsonl"))) == 2
    assert testbook.get("a" * 64, second.version) is None  # the champion is to be tested again
    testbook.save(ChampionTestRecord(event=champion_tested(second.version), items=[]))
    assert testbook.get("a" * 64, first.version) == old  # the earlier version's score stays
    assert [r.event.suite_version for r in testbook.for_checkpoint("a" * 64)] == sorted([first.version, second.version])


def test_a_saved_test_suite_that_shares_a_problem_with_the_selection_suite_is_refused(tmp_path: Path):
    selection = load_or_create_suite(tmp_path, BOTH, 2, seed=5)
    path = tmp_path / f"skills-test-seed11-for-{selection.version}.jsonl"
    path.write_bytes((tmp_path / "skills-seed5-binary3-syllo2-n2.jsonl").read_bytes())
    with pytest.raises(ValueError, match="shares 10 problem"):
        load_or_create_test_suite(tmp_path, selection, seed=11)


def champion_tested(version: str) -> ChampionTested:
    return ChampionTested(
        run_id="r", step=1, checkpoint_uri="file:///c", checkpoint_sha256="a" * 64, suite="skills-test",
        suite_version=version, exact_match=0.5, exact_match_low=0.2, exact_match_high=0.8, num_examples=2,
        val_loss=1.0, levels={}, outcomes="80", eval_id="e", selection_suite_version="skills-v2-x",
    )
