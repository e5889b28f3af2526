"""The held-out suite: deterministic, versioned by content, fixed once saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.skills import binary
from services.evaluator import suite as suite_module
from services.evaluator.suite import build_suite, load_or_create_suite


def test_suite_is_deterministic_and_versioned_by_content():
    first, again = build_suite(3, 16, seed=7), build_suite(3, 16, seed=7)
    assert first == again
    assert first.version.startswith("binary-v1-") and len(first.items) == 48
    assert [sum(i.level == level for i in first.items) for level in (1, 2, 3)] == [16, 16, 16]
    assert build_suite(3, 16, seed=8).version != first.version
    assert build_suite(2, 16, seed=7).version != first.version


def test_suite_items_are_held_out_from_training_data():
    suite = build_suite(binary.MAX_LEVEL, 16, seed=1)
    prompts = {item.messages[0].content for item in suite.items}
    training = {
        r["messages"][0]["content"] for level in range(1, 6) for s in range(10) for r in binary.generate(level, 200, s)
    }
    assert not prompts & training


def test_saved_suite_is_reused_even_if_the_generator_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    saved = load_or_create_suite(tmp_path, 2, 4, seed=5)
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    monkeypatch.setattr(suite_module, "build_suite", lambda *a: pytest.fail("must not regenerate"))
    assert load_or_create_suite(tmp_path, 2, 4, seed=5) == saved


def test_bad_level_is_refused():
    with pytest.raises(ValueError):
        build_suite(binary.MAX_LEVEL + 1, 4, seed=0)
