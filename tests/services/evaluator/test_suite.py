"""The held-out suite: every skill's levels, deterministic, versioned by content, fixed once saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.settings import load_settings
from libs.common.skills import SKILLS, binary, syllo
from services.evaluator import suite as suite_module
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import build_suite, load_or_create_suite

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
