"""The Binary skill: notation, levels, answer reading and judging, and the seed validation sets."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import random

import pytest

from libs.common.skills import binary

SEED_DIR = Path(__file__).parents[3] / "data" / "seed_binary"
_CIRCLED = "[①⓪]+"


def test_circled_round_trip():
    assert binary.to_circled(35) == "①⓪⓪⓪①①"
    assert binary.from_circled("①⓪⓪⓪①①") == 35
    assert binary.to_circled(0) == "⓪"
    for value in range(0, 5000, 7):
        assert binary.from_circled(binary.to_circled(value)) == value
    with pytest.raises(ValueError):
        binary.from_circled("1①")
    with pytest.raises(ValueError):
        binary.to_circled(-1)


# ---------------------------------------------------------------------------- levels


def test_seven_levels_by_magnitude_with_a_growing_mix_of_operations():
    assert binary.MAX_LEVEL == 7 and sorted(binary.LEVELS) == list(range(1, 8))
    levels = [binary.LEVELS[level] for level in range(1, 8)]
    assert (levels[0].low, levels[-1].low, levels[-1].high) == (1, 10_000, 100_000)
    assert all(a.low < b.low and a.high < b.high for a, b in pairwise(levels))
    assert all(set(a.kinds) <= set(b.kinds) for a, b in pairwise(levels))
    first_level = {kind: next(n for n, spec in enumerate(levels, 1) if kind in spec.kinds)
                   for kind in levels[-1].kinds}
    assert first_level == {
        "todecimal": 1, "tobinary": 1, "add": 1, "subtract": 2, "leftshift": 3, "rightshift": 3,
        "multiply": 4, "chained-add-shift": 5, "chained-add-shift-shift": 6,
    }


def _operands(prompt: str) -> list[int]:
    """The level-sized numbers of a generated prompt (not multipliers or shift amounts)."""
    circled = [binary.from_circled(c) for c in re.findall(_CIRCLED, prompt)]
    if prompt.startswith("Convert this decimal"):
        return [int(prompt.split()[-1])]
    if prompt.startswith(("Multiply", "Shift")):
        return circled[:1]
    return circled


@pytest.mark.parametrize("level", range(1, binary.MAX_LEVEL + 1))
def test_generated_problems_fit_their_level(level: int):
    spec = binary.LEVELS[level]
    rows = binary.generate(level, 300, seed=3)
    assert rows == binary.generate(level, 300, seed=3)
    assert rows != binary.generate(level, 300, seed=4)
    assert {row["scenario"] for row in rows} == set(spec.kinds)
    for row in rows:
        user, assistant = row["messages"]
        assert row["skill"] == "binary" and row["level"] == level
        assert all(spec.low <= value <= spec.high for value in _operands(user["content"])), user["content"]
        assert binary.is_correct(row["expected"], assistant["content"])
        if not row["scenario"].startswith("chained") and row["scenario"] not in binary._WORKED:
            assert binary.extract_answer(assistant["content"].splitlines()[0]) == row["expected"]  # stated at once
        else:
            assert assistant["content"].splitlines()[-1].startswith("Final result:")


def test_conversions_are_one_statement_and_sums_and_differences_are_worked_through_decimal():
    for row in binary.generate(1, 100, seed=0):
        if row["scenario"] in ("todecimal", "tobinary"):
            assert "\n" not in row["messages"][1]["content"]
    worked = [r for level in (1, 2, 7) for r in binary.generate(level, 60, seed=0) if r["scenario"] in ("add", "subtract")]
    assert {r["scenario"] for r in worked} == {"add", "subtract"}
    for row in worked:
        lines = row["messages"][1]["content"].splitlines()
        assert [line.split(":")[0] for line in lines if line] == ["Step 1", "Step 2", "Step 3", "Step 4", "Final result"]
        assert lines[0].startswith("Step 1: todecimal ") and lines[3].startswith("Step 4: tobinary ")
        assert binary.is_correct(row["expected"], row["messages"][1]["content"])
    # A sum is written larger term first, so a problem and its commuted twin share the decimal fact.
    step = "Step 3: 18 + 11: ones 8 + 1 = 9, tens 1 + 1 + 0 = 2, total 29\n"
    assert step in binary._arithmetic("add", 11, 18, verified=False).answer
    assert step in binary._arithmetic("add", 18, 11, verified=False).answer
    # Shifts and products at level 2 and up still state the result, then verify it in decimal.
    stated = [r for r in binary.generate(4, 100, seed=0) if r["scenario"] in ("leftshift", "multiply")]
    assert stated and all("\n\nVerification: " in r["messages"][1]["content"] for r in stated)


def test_the_decimal_step_goes_column_by_column_with_every_carry_and_borrow_written():
    assert binary._columns(28, 19, "+") == "28 + 19: ones 8 + 9 = 17, tens 2 + 1 + 1 = 4, total 47"
    assert binary._columns(95, 17, "+") == "95 + 17: ones 5 + 7 = 12, tens 9 + 1 + 1 = 11, total 112"
    assert binary._columns(7, 5, "+") == "7 + 5: ones 7 + 5 = 12, total 12"
    assert binary._columns(412, 397, "-") == (
        "412 - 397: ones 12 - 7 = 5, tens 11 - 9 - 1 = 1, hundreds 4 - 3 - 1 = 0, total 15"
    )
    assert binary._columns(100, 1, "-") == "100 - 1: ones 10 - 1 = 9, tens 10 - 0 - 1 = 9, hundreds 1 - 0 - 1 = 0, total 99"
    # Every column of every level's operands: the total is the true sum or difference.
    rng = random.Random(0)
    for level, spec in binary.LEVELS.items():
        for _ in range(500):
            a, b = rng.randint(spec.low, spec.high), rng.randint(spec.low, spec.high)
            x, y = max(a, b), min(a, b)
            assert binary._columns(x, y, "+").endswith(f", total {x + y}"), level
            assert binary._columns(x, y, "-").endswith(f", total {x - y}"), level


def test_a_worked_answer_with_a_wrong_step_is_wrong():
    right = binary._arithmetic("add", 11, 18, verified=False).answer
    assert binary.is_correct("①①①⓪①", right)
    assert not binary.is_correct("①①①⓪①", right.replace("todecimal ①⓪①① = 11", "todecimal ①⓪①① = 12"))
    assert not binary.is_correct("①①①⓪①", right.replace("tobinary 29 = ①①①⓪①", "tobinary 29 = ①①①①①"))
    # A decimal step whose total is not the sum, even when the final result is right.
    assert not binary.is_correct("①①①⓪①", right.replace("total 29", "total 28"))


def test_level_one_holds_enough_held_out_sums_for_a_selection_suite_and_a_sealed_test():
    # Every level-1 problem, enumerated: 31 + 31 conversions and 961 ordered sums.
    spec, numbers = binary.LEVELS[1], range(binary.LEVELS[1].low, binary.LEVELS[1].high + 1)
    assert set(spec.kinds) == {"todecimal", "tobinary", "add"}
    problems = {p.prompt for a in numbers for p in (binary._todecimal(a), binary._tobinary(a))}
    problems |= {binary._arithmetic("add", a, b, verified=False).prompt for a in numbers for b in numbers}
    splits = {split: {p for p in problems if binary.split_of(p) == split} for split in ("train", "eval", None)}
    keys = {split: {binary.problem_key(p) for p in prompts} for split, prompts in splits.items()}
    # What holding out costs at level 1 (README, "Held out means never seen"): 296 of the 1,023
    # problems are never trained, 127 distinct sums (either order) are held out, and 51 sums
    # whose result is a held-out number (42, 46, 51, 55, 56) are neither trained nor scored.
    assert len(problems) == 1023
    assert {split: len(prompts) for split, prompts in splits.items()} == {"train": 727, "eval": 245, None: 51}
    assert {split: len(k) for split, k in keys.items()} == {"train": 374, "eval": 127, None: 26}
    for seed in range(3):
        prompts = [r["messages"][0]["content"] for r in binary.generate(1, 96, seed=seed, split="eval")]
        assert len({binary.problem_key(p) for p in prompts}) == 96
    with pytest.raises(ValueError, match="too few distinct eval problems"):
        binary.generate(1, 128, seed=0, split="eval")


def test_a_problem_is_the_same_whatever_its_operand_order_or_wording():
    a, b = binary.to_circled(11), binary.to_circled(18)
    ours = binary._arithmetic("add", 11, 18, verified=False).prompt
    assert binary.problem_key(ours) == binary.problem_key(f"Add these binary numbers:\n\n{b} + {a}")
    assert binary.problem_key(ours) == binary.problem_key(
        f"Add these two binary numbers using ⓪① notation:\n\n{b} + {a}\n\nShow your work in prefix notation.")
    assert binary.problem_key(binary._todecimal(24).prompt) == binary.problem_key(binary._tobinary(24).prompt)
    # Subtraction does not commute.
    assert binary.problem_key(f"Subtract these binary numbers:\n\n{b} - {a}") == "binary subtract 18 11"
    assert binary.problem_key("Perform a right shift on this binary number by 3 positions:\n\n①⓪⓪⓪⓪①⓪ >> 3") == \
        "binary rightshift 66 3"
    with pytest.raises(ValueError, match="not a Binary problem"):
        binary.split_of("What is the capital of France?")


def test_bad_level_is_refused():
    for level in (0, binary.MAX_LEVEL + 1):
        with pytest.raises(ValueError, match="binary level must be 1..7"):
            binary.generate(level, 1, seed=0)


# ---------------------------------------------------------------------------- reading and judging


@pytest.mark.parametrize(("text", "expected"), [
    ("add ①⓪① ①① = ①⓪⓪⓪\n\nVerification: 5 + 3 = 8 ✓", "①⓪⓪⓪"),
    ("todecimal ①⓪⓪⓪①① = 35", "35"),
    ("  multiply  ①①   ①⓪ =   ①①⓪  ✓", "①①⓪"),
    ("Step 1: add ①① ① = ①⓪⓪ (4)\n\nFinal result: ①⓪⓪⓪ = 8 (decimal)", "①⓪⓪⓪"),
    ("Step 1: add ①① ① = ①⓪⓪ (4)", "①⓪⓪"),
    ("A) ①⓪⓪⓪ = 8 (decimal)\n   This IS a power of 2.\n\nB) ①①⓪ = 6 (decimal)\n   This is NOT a power of 2.", "A"),
    ("A) ①⓪⓪ = 4\n   This IS a power of 2.\nB) ①⓪⓪⓪ = 8\n   This IS a power of 2.", "A, B"),
    ("A) ①①⓪ = 6\n   This is NOT a power of 2.", None),
    ("The answer is ①⓪", None),
    ("add ①⓪① ①① =", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None):
    assert binary.extract_answer(text) == expected


@pytest.mark.parametrize(("rule", "right", "wrong"), [
    ("the stated result is the expected one",
     "add ①⓪① ①① = ①⓪⓪⓪", "add ①⓪① ①① = ①⓪⓪①"),
    ("a result must be stated in prefix form",
     "add ①⓪① ①① = ①⓪⓪⓪", "①⓪⓪⓪"),
    ("a dropped result is no result",
     "add ①⓪① ①① = ①⓪⓪⓪", "add ①⓪① ①① ="),
    ("every prefix statement must hold (a miscopied operand)",
     "add ①⓪① ①① = ①⓪⓪⓪", "add ①⓪⓪ ①① = ①⓪⓪⓪"),
    ("the result is in the operation's notation",
     "todecimal ①⓪① = 5", "todecimal ①⓪① = ①⓪①"),
    ("a circled result has no leading zero",
     "add ① ① = ①⓪", "add ① ① = ⓪①⓪"),
    ("a statement has the operation's operands",
     "leftshift ①① 2 = ①①⓪⓪", "leftshift ①① = ①①⓪⓪"),
    ("intermediate steps must hold too",
     "Step 1: add ①① ① = ①⓪⓪ (4)\n\nStep 2: leftshift ①⓪⓪ 1 = ①⓪⓪⓪ (8)\n\nFinal result: ①⓪⓪⓪ = 8 (decimal)",
     "Step 1: add ①① ① = ①⓪⓪ (4)\n\nStep 2: leftshift ①⓪⓪ 1 = ①⓪⓪⓪⓪ (16)\n\nFinal result: ①⓪⓪⓪ = 8 (decimal)"),
    ("a circled = decimal equation must hold",
     "tobinary 8 = ①⓪⓪⓪\n\nVerification: ①⓪⓪⓪ = 8 (decimal) ✓", "tobinary 8 = ①⓪⓪⓪\n\nVerification: ①⓪⓪⓪ = 9 ✓"),
])
def test_is_correct_rules(rule: str, right: str, wrong: str):
    expected = binary.extract_answer(right)
    assert binary.is_correct(expected, right), rule
    assert not binary.is_correct(expected, wrong), rule


def test_decimal_verification_arithmetic_is_not_judged():
    assert binary.is_correct("①⓪⓪⓪", "add ①⓪① ①① = ①⓪⓪⓪\nVerification: 5 + 3 = 9")


def test_a_negative_difference_is_not_a_true_statement():
    assert binary.false_claim("subtract ① ①① = ①⓪") == "subtract ① ①① = ①⓪"
    assert binary.false_claim("subtract ①① ① = ①⓪") is None


def test_expected_from_answer_refuses_bad_gold():
    assert binary.expected_from_answer("add ①⓪① ①① = ①⓪⓪⓪\n\nVerification: 5 + 3 = 8 ✓") == "①⓪⓪⓪"
    with pytest.raises(ValueError, match="states no result"):
        binary.expected_from_answer("It is eight.")
    with pytest.raises(ValueError, match="false claim"):
        binary.expected_from_answer("add ①⓪① ①① = ①⓪⓪①")


# ---------------------------------------------------------------------------- seed data


def _recompute(scenario: str, prompt: str) -> str:
    """The answer to a seed prompt, computed from the prompt alone (independently of the scorer)."""
    kind = scenario.split("-")[0]
    if kind == "todecimal":
        return str(binary.from_circled(re.findall(_CIRCLED, prompt)[-1]))
    if kind == "tobinary":
        return binary.to_circled(int(re.findall(r"\d+", prompt)[-1]))
    if kind in ("add", "subtract", "multiply"):
        a, sym, b = re.search(rf"({_CIRCLED}) ([+\-×]) ({_CIRCLED})", prompt).groups()
        x, y = binary.from_circled(a), binary.from_circled(b)
        return binary.to_circled({"+": x + y, "-": x - y, "×": x * y}[sym])
    if kind in ("leftshift", "rightshift"):
        if match := re.search(rf"({_CIRCLED}) (<<|>>) (\d+)", prompt):
            a, sym, n = match.groups()
        else:  # "Original: A\nShift left by: n"
            a = re.search(rf"Original: ({_CIRCLED})", prompt).group(1)
            n, sym = re.search(r"by: (\d+)", prompt).group(1), "<<"
        value = binary.from_circled(a)
        return binary.to_circled(value << int(n) if sym == "<<" else value >> int(n))
    if kind == "chained":
        a, b = re.search(rf"Add ({_CIRCLED}) \+ ({_CIRCLED})", prompt).groups()
        value = binary.from_circled(a) + binary.from_circled(b)
        for direction, n in re.findall(r"(Left|Right) shift (?:the )?result by (\d+)", prompt):
            value = value << int(n) if direction == "Left" else value >> int(n)
        return binary.to_circled(value)
    if kind == "conversion":  # roundtrip: the first statement converts to binary
        return binary.to_circled(int(re.search(r"Convert (\d+)", prompt).group(1)))
    if kind == "shift":  # equivalence: the first statement shifts left
        a = binary.from_circled(re.search(rf"Given ({_CIRCLED})", prompt).group(1))
        return binary.to_circled(a << int(re.search(r"left shift by (\d+)", prompt).group(1)))
    if kind == "pattern":  # which options are powers of 2
        options = re.findall(rf"^([A-Z])\) ({_CIRCLED})$", prompt, re.MULTILINE)
        return ", ".join(label for label, c in options if binary.from_circled(c).bit_count() == 1)
    raise AssertionError(f"unknown seed scenario {scenario}")


def _flip(digit: str) -> str:
    return {"①": "⓪", "⓪": "①"}.get(digit) or str((int(digit) + 1) % 10)


def _flip_last_digit(text: str, start: int, end: int) -> str:
    """`text` with the last digit (circled or decimal) in text[start:end] flipped."""
    i = max(i for i in range(start, end) if text[i] in "①⓪0123456789")
    return text[:i] + _flip(text[i]) + text[i + 1:]


_OPERATION = "|".join(binary.OPERATIONS)
_STATEMENT = re.compile(rf"^[ \t]*(?:Step \d+:[ \t]*)?({_OPERATION}) ([^=\n]*)=([^\n]*)$", re.MULTILINE)
_FINAL = re.compile(r"^Final result:([^=\n]*)", re.MULTILINE)


def _flip_result(text: str) -> str:
    if final := _FINAL.search(text):
        return _flip_last_digit(text, *final.span(1))
    if statement := _STATEMENT.search(text):
        result = re.search(rf"{_CIRCLED}|\d+", statement.group(3))
        return _flip_last_digit(text, statement.start(3) + result.start(), statement.start(3) + result.end())
    return text.replace("IS a power", "@").replace("is NOT a power", "IS a power").replace("@", "is NOT a power")


def _drop_result(text: str) -> str:
    if final := _FINAL.search(text):
        return text[:final.start(1)] + text[final.end(1):].split("\n", 1)[-1]
    if statement := _STATEMENT.search(text):
        return text[:statement.start(3)] + text[statement.end(3):]
    return "\n".join(line for line in text.splitlines() if "IS a power" not in line)


def _wrong_operand(text: str) -> str:
    """The first operand miscopied in its second digit (a right shift drops the last ones)."""
    if statement := _STATEMENT.search(text):
        operand = re.search(rf"{_CIRCLED}|\d+", statement.group(2))
        start = statement.start(2) + operand.start()
    else:  # the power-of-two questions: the first option's number, restated with its value
        start = re.search(rf"^A\) ({_CIRCLED})", text, re.MULTILINE).start(1)
    return _flip_last_digit(text, start, start + 2)


def _seed_rows() -> list[dict]:
    files = sorted(SEED_DIR.glob("*.jsonl"))
    assert [f.name for f in files] == [f"val_binary_{d}_100.jsonl" for d in ("easy", "hard", "medium")]
    return [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]


def test_every_seed_gold_answer_scores_right_and_every_corruption_wrong():
    rows = _seed_rows()
    assert len(rows) == 300
    kinds, failures = Counter(), []
    for row in rows:
        gold = row["assistant_response"]
        expected = binary.expected_from_answer(gold)
        kinds[row["scenario"].split("-")[0]] += 1
        if expected != _recompute(row["scenario"], row["user_prompt"]):
            failures.append((row["id"], "expected", expected))
        if not binary.is_correct(expected, gold):
            failures.append((row["id"], "gold scored wrong"))
        for corrupt in (_flip_result, _drop_result, _wrong_operand):
            corrupted = corrupt(gold)
            assert corrupted != gold, (row["id"], corrupt.__name__)
            if binary.is_correct(expected, corrupted):
                failures.append((row["id"], f"{corrupt.__name__} scored right", corrupted))
    print(f"seed rows checked: {len(rows)} ({dict(kinds)}), failures {len(failures)}")
    assert not failures, failures[:5]
