"""Held-out items are novel: no training row of any level poses one in any wording or order, or states
its answer as a step.

Checked from the text of the rows alone, with a reader of this test's own (not the skills' facts),
over every training problem of Binary level 1, large samples of levels 2-3, samples of levels
4-7 and of every SYLLO level, against the held-out items a suite draws.
"""

from __future__ import annotations

import re

import msgspec
import pytest

from flywheel.demo import held_out_questions
from libs.common.skills import binary, syllo
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.suite import build_confirmation_suite, build_suite, build_test_suite

CIRCLED = re.compile("[①⓪]+")
# What is really asked: the evaluator's selection, sealed-test and confirmation suites with its
# default settings, and the demo's questions.
_DEFAULTS = EvaluatorSettings()
_SELECTION = build_suite(_DEFAULTS.suite_max_levels, _DEFAULTS.items_per_level, _DEFAULTS.suite_seed)
_TEST = build_test_suite(_SELECTION, _DEFAULTS.test_seed)
_CONFIRMATION = build_confirmation_suite(_SELECTION, _TEST, _DEFAULTS.confirm_seed, _DEFAULTS.confirm_items_per_level)
SUITE_ITEMS = [item for suite in (_SELECTION, _TEST, _CONFIRMATION) for item in suite.items]


def _numbers(text: str) -> list[int]:
    return [int(token.translate(str.maketrans("⓪①", "01")), 2) for token in CIRCLED.findall(text)]


def identity(prompt: str) -> tuple:
    """What a Binary prompt asks, read independently: the operation and its operands, in a canonical order."""
    numbers = _numbers(prompt)
    if "in sequence" in prompt:
        return ("chain", tuple(sorted(numbers[:2])), tuple(re.findall(r"(Left|Right) shift the result by (\d+)", prompt)))
    if shift := re.search(r"(<<|>>)\s*(\d+)", prompt):
        return ("shift", shift.group(1), numbers[0], int(shift.group(2)))
    for symbol, commutes in (("+", True), ("×", True), ("-", False)):
        if f" {symbol} " in prompt:
            return (symbol, tuple(sorted(numbers)) if commutes else tuple(numbers))
    if "to decimal" in prompt:
        return ("convert", numbers[0])
    return ("convert", int(re.findall(r"\d+", prompt)[-1]))


def _training_rows(skill, samples: dict[int, int]) -> list[dict]:
    return [row for level, n in samples.items() for seed in range(2) for row in skill.generate(level, n, seed)]


@pytest.fixture(scope="module")
def binary_training() -> dict:
    # Level 1 has 727 distinct training problems: 2 x 20,000 draws hold every one of them (a sum's
    # chance to be missed is about e^-13).
    rows = _training_rows(binary, {1: 20_000, 2: 6_000, 3: 6_000, 4: 1_000, 5: 1_000, 6: 1_000, 7: 1_000})
    lines = {line.strip() for row in rows for line in row["messages"][1]["content"].splitlines() if line.strip()}
    return {
        "identities": {identity(row["messages"][0]["content"]) for row in rows},
        "lines": lines,
        # Every line with its "Step n:" label taken off: a step of one problem is the line of another.
        "statements": {re.sub(r"^Step \d+:\s*", "", line) for line in lines},
        "numbers": {n for row in rows for message in row["messages"] for n in _numbers(message["content"])},
        "level1_prompts": {row["messages"][0]["content"] for row in rows if row["level"] == 1},
    }


def _held_out(skill: str, level: int) -> list[dict]:
    asked = [msgspec.to_builtins(item) for item in SUITE_ITEMS if item.skill == skill and item.level == level]
    if skill == binary.SKILL and level == 1:
        asked += held_out_questions()
    return asked


def test_every_level_one_training_problem_is_in_the_sample(binary_training):
    assert len(binary_training["level1_prompts"]) == 727


@pytest.mark.parametrize("level", [1, 2, 3])
def test_no_held_out_binary_item_is_trained_in_any_wording_or_order(binary_training, level: int):
    seen = [row["messages"][0]["content"] for row in _held_out(binary.SKILL, level)
            if identity(row["messages"][0]["content"]) in binary_training["identities"]]
    assert not seen, f"{len(seen)} held-out items are trained modulo order or wording, e.g. {seen[:3]}"


@pytest.mark.parametrize("level", [1, 2, 3])
def test_no_held_out_binary_answer_can_be_copied_from_a_training_line(binary_training, level: int):
    """Each held-out item's gold answer works out a line no training row holds, and states no trained fact
    of its own: not the sum of a commuted twin, not a conversion shown as a step of a trained sum."""
    copied = []
    for row in _held_out(binary.SKILL, level):
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        lines = [re.sub(r"^Step \d+:\s*", "", line.strip()) for line in answer.splitlines() if line.strip()]
        if all(line in binary_training["statements"] for line in lines):
            copied.append((prompt, "every line of its answer is a training line"))
        kind = identity(prompt)
        if kind[0] == "convert":
            # A conversion's number appears in no training row at all, in any notation.
            if kind[1] in binary_training["numbers"]:
                copied.append((prompt, f"the number {kind[1]} is written in a training row"))
        elif kind[0] in ("+", "-"):
            # The decimal step ("28 + 19: ones ... total 47") is the sum's own fact, in either order.
            step = next(line for line in lines if re.match(r"\d+ [+-] \d+:", line))
            if step in binary_training["statements"]:
                copied.append((prompt, f"its decimal step is a training line: {step!r}"))
    assert not copied, f"{len(copied)} held-out items can be copied from training: {copied[:3]}"


def test_no_held_out_syllo_puzzle_can_be_answered_from_words_trained():
    trained = {word for row in _training_rows(syllo, dict.fromkeys(range(1, 6), 600)) for word in row["expected"]}
    copied = [row["expected"] for level in range(1, 6) for row in _held_out(syllo.SKILL, level)
              if set(row["expected"]) <= trained]
    assert not copied, f"{len(copied)} held-out puzzles ask only for trained words, e.g. {copied[:2]}"
