"""The Binary skill: notation, generation by level, answer extraction, and the seed validation sets."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from libs.common.skills import binary

SEED_DIR = Path(__file__).parents[3] / "data" / "seed_binary"


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


@pytest.mark.parametrize("level", range(1, binary.MAX_LEVEL + 1))
def test_generate_is_deterministic_and_self_consistent(level: int):
    rows = binary.generate(level, 50, seed=3)
    assert rows == binary.generate(level, 50, seed=3)
    assert rows != binary.generate(level, 50, seed=4)
    for row in rows:
        assert row["skill"] == "binary" and row["level"] == level
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert binary.is_correct(row["expected"], assistant["content"])
        assert binary.split_of(user["content"]) == "train"


def test_eval_split_is_disjoint_from_training_and_has_no_repeats():
    for level in range(1, binary.MAX_LEVEL + 1):
        train = {r["messages"][0]["content"] for seed in range(20) for r in binary.generate(level, 100, seed)}
        held_out = [r["messages"][0]["content"] for r in binary.generate(level, 16, seed=99, split="eval")]
        assert len(set(held_out)) == 16
        assert not train & set(held_out)


def test_difficulty_rises_with_level():
    def widest_number(level: int) -> int:
        rows = binary.generate(level, 200, seed=0)
        return max(len(run) for r in rows for run in re.findall(_CIRCLED, r["messages"][0]["content"]))

    widths = [widest_number(level) for level in range(1, 5)]
    assert widths == sorted(widths) and widths[0] <= 5 and widths[-1] >= 12
    assert all("Step 2:" in r["messages"][1]["content"] for r in binary.generate(binary.MAX_LEVEL, 20, seed=0))
    with pytest.raises(ValueError):
        binary.generate(binary.MAX_LEVEL + 1, 1, seed=0)


@pytest.mark.parametrize(("text", "expected"), [
    ("add ①⓪① ①① = ①⓪⓪⓪\n\nVerification: 5 + 3 = 8 ✓", "①⓪⓪⓪"),
    ("todecimal ①⓪⓪⓪①① = 35", "35"),
    ("  multiply  ①①   ①⓪ =   ①①⓪  ✓", "①①⓪"),
    ("Step 1: add ①① ① = ①⓪⓪ (4)\n\nFinal result: ①⓪⓪⓪ = 8 (decimal)", "①⓪⓪⓪"),
    ("Step 1: add ①① ① = ①⓪⓪ (4)", "①⓪⓪"),
    ("The answer is ①⓪", None),
    ("add ①⓪① ①① =", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None):
    assert binary.extract_answer(text) == expected


def test_is_correct_compares_the_stated_result_only():
    assert binary.is_correct("①⓪⓪⓪", "add ①⓪① ①① = ①⓪⓪⓪\nVerification: wrong 5 + 3 = 9")
    assert not binary.is_correct("①⓪⓪⓪", "add ①⓪① ①① = ①⓪⓪①")
    assert not binary.is_correct("①⓪⓪⓪", "①⓪⓪⓪")  # no prefix-form line: no answer


# ---------------------------------------------------------------------------- seed data

_CIRCLED = "[①⓪]+"


def _recompute(scenario: str, prompt: str) -> str | None:
    """The right answer to a seed prompt, computed from the prompt alone; None if unsupported."""
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
    if kind == "conversion":  # roundtrip: the first prefix line converts to binary
        return binary.to_circled(int(re.search(r"Convert (\d+)", prompt).group(1)))
    return None


def _seed_rows() -> list[dict]:
    files = sorted(SEED_DIR.glob("*.jsonl"))
    assert len(files) == 3, f"seed files missing under {SEED_DIR}"
    return [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]


def test_extract_answer_reads_the_seed_validation_sets():
    rows = _seed_rows()
    checked, wrong = Counter(), []
    for row in rows:
        expected = _recompute(row["scenario"], row["user_prompt"])
        if expected is None:
            continue
        checked[row["scenario"].split("-")[0]] += 1
        if not binary.is_correct(expected, row["assistant_response"]):
            wrong.append((row["id"], row["scenario"], expected, binary.extract_answer(row["assistant_response"])))
    core = [r for r in rows if r["scenario"].split("-")[0] in ("add", "subtract", "multiply", "todecimal")]
    core_checked = sum(checked[k] for k in ("add", "subtract", "multiply", "todecimal"))
    print(f"seed coverage: {sum(checked.values())}/{len(rows)} rows checked ({dict(checked)}), "
          f"core {core_checked}/{len(core)}, mismatches {len(wrong)}")
    assert not wrong, wrong[:5]
    assert core_checked >= 0.9 * len(core)
    assert sum(checked.values()) >= 0.7 * len(rows)
