"""Unit: what a practice dataset holds, and how many are due."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from libs.common.skills import binary
from services.curriculum.pacing import datasets_due
from services.curriculum.settings import CurriculumSettings
from services.curriculum.synthesis import level_mix, synthetic_dataset


def test_level_mix_reviews_earlier_levels_evenly_and_level_one_has_nothing_to_review():
    assert level_mix(1, 200, 0.25) == {1: 200}
    assert level_mix(2, 200, 0.25) == {1: 50, 2: 150}
    assert level_mix(4, 200, 0.25) == {1: 17, 2: 17, 3: 16, 4: 150}
    assert level_mix(3, 200, 0.0) == {3: 200}
    assert sum(level_mix(7, 201, 0.3).values()) == 201


def test_a_dataset_holds_its_levels_and_is_fixed_by_its_number():
    dataset = synthetic_dataset("binary", 3, number=5, rows=40, review_fraction=0.25)
    assert dataset.name == "curriculum-binary-L3-5" and len(dataset.rows) == 40
    again = synthetic_dataset("binary", 3, number=5, rows=40, review_fraction=0.25)
    assert (dataset.id, dataset.rows) == (again.id, again.rows)
    assert dataset.rows != synthetic_dataset("binary", 3, number=6, rows=40, review_fraction=0.25).rows
    # Every row is a training-split problem: the evaluation suite can never be practised.
    assert all(binary.split_of(row["messages"][0]["content"]) == "train" for row in dataset.rows)


def test_datasets_are_due_while_fewer_than_min_queued_wait():
    assert [datasets_due(depth, 2) for depth in range(4)] == [2, 1, 0, 0]


@pytest.mark.parametrize("skills", [["binary", "chess"], [], ["binary", "binary"]])
def test_skills_must_be_known_and_distinct(skills):
    with pytest.raises(SettingsError, match="skills"):
        load_settings(CurriculumSettings, "curriculum", environ={}, skills=skills)


def test_synthetic_dataset_is_numbered_seeded_and_plain_chat():
    one, again, two = (synthetic_dataset("binary", 2, n, 20) for n in (1, 1, 2))
    assert one.id == again.id and one.rows == again.rows
    assert one.id != two.id and one.rows != two.rows
    assert one.name == "curriculum-binary-L2-1" and one.priority == "low" and one.channel == "curriculum"
    assert one.submitted_by == "curriculum" and len(one.rows) == 20
    assert all(set(row) == {"messages"} for row in one.rows)
    assert all(binary.split_of(row["messages"][0]["content"]) == "train" for row in one.rows)
    with pytest.raises(ValueError):
        synthetic_dataset("poetry", 1, 1, 1)
