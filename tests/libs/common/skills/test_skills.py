"""The skills behind one interface: the registry, the shared train/eval split, generation at every level."""

from __future__ import annotations

import random

import pytest

from libs.common.skills import BINARY, HOLD_OUT_BUCKETS, SKILLS, SYLLO, Skill, get_skill, held_out
from libs.common.skills.skill import Facts, Problem, draw_rows, split_from_facts

LEVELS = [(name, level) for name, skill in SKILLS.items() for level in range(1, skill.max_level + 1)]


def test_registry_holds_both_skills_behind_one_interface():
    assert SKILLS == {"binary": BINARY, "syllo": SYLLO}
    assert (BINARY.max_level, SYLLO.max_level) == (7, 5)
    for name, skill in SKILLS.items():
        assert isinstance(skill, Skill) and skill.name == name and get_skill(name) is skill


def test_an_unknown_skill_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown skill 'poetry': the skills are binary, syllo"):
        get_skill("poetry")


def test_a_share_of_facts_is_held_out_by_their_hash():
    for share in (1, 4):
        marks = [held_out(f"fact {i}", share) for i in range(16_000)]
        assert marks == [held_out(f"fact {i}", share) for i in range(16_000)]
        assert abs(sum(marks) - 16_000 * share / HOLD_OUT_BUCKETS) < 200


def test_a_problem_is_held_out_when_it_tests_a_held_out_fact_and_trained_when_it_states_none():
    out = {"b", "x"}.__contains__
    assert split_from_facts(Facts("k", frozenset({"a", "b"}), frozenset({"a", "b", "c"})), out) == "eval"
    assert split_from_facts(Facts("k", frozenset({"a"}), frozenset({"a", "c"})), out) == "train"
    # Tests only trained facts but states a held-out one on the way: neither trained nor scored.
    assert split_from_facts(Facts("k", frozenset({"a"}), frozenset({"a", "x"})), out) is None


@pytest.mark.parametrize(("name", "level"), LEVELS)
def test_every_level_generates_rows_of_the_interface(name: str, level: int):
    skill = get_skill(name)
    for split in ("train", "eval"):
        rows = skill.generate(level, 16, 5, split)
        assert len(rows) == 16
        for row in rows:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert (row["skill"], row["level"]) == (name, level) and row["scenario"]
            assert skill.split_of(user["content"]) == split
            assert skill.is_correct(row["expected"], assistant["content"])
            assert skill.extract_answer(assistant["content"]) is not None


@pytest.mark.parametrize(("name", "level"), LEVELS)
def test_generation_is_deterministic_per_level_n_seed_and_split(name: str, level: int):
    skill = get_skill(name)
    rows = skill.generate(level, 30, 11, "train")
    assert rows == skill.generate(level, 30, 11, "train")
    assert skill.generate(level, 10, 11, "train") == rows[:10]
    assert rows != skill.generate(level, 30, 12, "train")
    assert skill.generate(level, 30, 11, "eval") == skill.generate(level, 30, 11, "eval")


@pytest.mark.parametrize(("name", "level"), LEVELS)
def test_train_and_eval_never_share_a_problem(name: str, level: int):
    skill = get_skill(name)
    train = [r["messages"][0]["content"] for seed in range(4) for r in skill.generate(level, 500, seed)]
    held_out = [r["messages"][0]["content"] for seed in range(2) for r in skill.generate(level, 48, seed, "eval")]
    assert len(train) == 2000 and len(set(held_out[:48])) == 48  # a suite never repeats an item
    assert {skill.split_of(p) for p in train} == {"train"} and {skill.split_of(p) for p in held_out} == {"eval"}
    assert not set(train) & set(held_out)


def test_drawing_rows_refuses_bad_requests():
    def make(rng: random.Random) -> Problem:
        return Problem("only", f"problem {rng.randrange(4)}", "answer", "answer")

    def facts_of(prompt: str) -> Facts:
        return Facts(prompt, frozenset({prompt}), frozenset({prompt}))

    def split_of(facts: Facts) -> str:  # "problem 0" is the one held-out problem
        return "eval" if facts.key == "problem 0" else "train"

    with pytest.raises(ValueError, match="split must be one of"):
        draw_rows("toy", 1, 1, 0, "test", make, facts_of, split_of)
    with pytest.raises(ValueError, match="row count must be >= 0"):
        draw_rows("toy", 1, -1, 0, "train", make, facts_of, split_of)
    with pytest.raises(ValueError, match="too few distinct eval problems"):
        draw_rows("toy", 1, 2, 0, "eval", make, facts_of, split_of)  # four problems, one of them eval
    assert {r["messages"][0]["content"] for r in draw_rows("toy", 1, 20, 0, "train", make, facts_of, split_of,
                                                             exclude={"problem 1"})} == {"problem 2", "problem 3"}
    rows = draw_rows("toy", 1, 3, 0, "train", make, facts_of, split_of)
    assert rows[0] == {"messages": [{"role": "user", "content": rows[0]["messages"][0]["content"]},
                                    {"role": "assistant", "content": "answer"}],
                       "skill": "toy", "level": 1, "scenario": "only", "expected": "answer"}
