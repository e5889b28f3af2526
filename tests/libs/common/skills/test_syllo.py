"""The SYLLO skill: the word list, puzzles by level, the gold answer's layouts, and judging answers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from libs.common.skills import syllo

_CLUE = re.compile(r"^(\d+)\. ((?:___ ?)+) — (.+)$", re.MULTILINE)


def _rows(level: int, n: int = 60, seed: int = 0) -> list[dict]:
    return syllo.generate(level, n, seed=seed)


def _answer(row: dict) -> str:
    return row["messages"][1]["content"]


# ---------------------------------------------------------------------------- the word list


def test_word_list_is_large_enough_for_every_level():
    by_syllables = Counter(len(w.syllables) for w in syllo.WORDS)
    assert len(syllo.WORDS) >= 400 and min(by_syllables[n] for n in (2, 3, 4)) >= 80, by_syllables
    for level, spec in syllo.LEVELS.items():
        pool = [w for w in syllo.WORDS if len(w.syllables) in spec.syllables]
        assert len(pool) >= 20 * spec.words, level


def _write_words(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"words": list(entries)}))
    return path


OCEAN = {"word": "ocean", "syllables": ["o", "cean"], "clue": "a vast body of salt water"}


@pytest.mark.parametrize(("entries", "reason"), [
    ([{**OCEAN, "syllables": ["oc", "an"]}], "must spell"),
    ([{**OCEAN, "word": "Ocean", "syllables": ["O", "cean"]}], "must spell the lowercase word"),
    ([{**OCEAN, "syllables": ["o", "", "cean"]}], "must spell"),
    ([{**OCEAN, "clue": "the ocean blue"}], "must not contain the word"),
    ([OCEAN, {**OCEAN, "clue": "salt water"}], "repeated words"),
    ([OCEAN, {"word": "sea", "syllables": ["sea"], "clue": OCEAN["clue"]}], "repeated clues"),
])
def test_word_list_rules(tmp_path: Path, entries: list[dict], reason: str):
    assert syllo.load_words(_write_words(tmp_path / "good.json", OCEAN))[0].syllables == ("o", "cean")
    with pytest.raises(ValueError, match=reason):
        syllo.load_words(_write_words(tmp_path / "bad.json", *entries))


# ---------------------------------------------------------------------------- puzzles


@pytest.mark.parametrize("level", range(1, syllo.MAX_LEVEL + 1))
def test_puzzles_fit_their_level(level: int):
    spec = syllo.LEVELS[level]
    for row in _rows(level):
        prompt, puzzle = row["messages"][0]["content"], row["puzzle"]
        words = {w.word: w for w in syllo.WORDS}
        answers = [words[a] for a in puzzle["answers"]]
        assert len(answers) == spec.words and all(len(w.syllables) in spec.syllables for w in answers)
        tiles = [tile for w in answers for tile in w.syllables]
        herrings = Counter(puzzle["syllables"]) - Counter(tiles)
        assert sum(herrings.values()) == spec.red_herrings and not set(herrings) & set(tiles)
        assert Counter(puzzle["syllables"]) == Counter(tiles) + herrings and puzzle["difficulty"] == level
        # The prompt: rules, slots with clues, the red-herring note, the bank, the output contract.
        clues = _CLUE.findall(prompt)
        assert [(int(n), slots.count("___"), clue) for n, slots, clue in clues] == [
            (i, len(w.syllables), w.clue) for i, w in enumerate(answers, 1)]
        assert "Rules:\n" in prompt and "Answer with one JSON object" in prompt
        note = f"{spec.red_herrings} tiles in the bank belong to no answer." if spec.red_herrings else "none;"
        assert f"Red herrings: {note}" in prompt
        assert f"Syllable bank ({len(puzzle['syllables'])} tiles): {' | '.join(puzzle['syllables'])}\n" in prompt
        assert row["expected"] == ["·".join(w.syllables).upper() for w in answers]


def test_difficulty_rises_with_the_level():
    def measure(level: int) -> tuple[float, float]:
        rows = _rows(level, 100)
        words = [len(r["puzzle"]["answers"]) for r in rows]
        tiles = [len(r["puzzle"]["syllables"]) / len(r["puzzle"]["answers"]) for r in rows]
        return sum(words) / len(rows), sum(tiles) / len(rows)

    words, tiles = zip(*(measure(level) for level in range(1, 6)))
    assert list(words) == [4, 5, 6, 7, 8]
    assert list(tiles) == sorted(tiles) and tiles[0] == 2 and tiles[-1] > 3.5
    assert [syllo.LEVELS[level].red_herrings for level in range(1, 6)] == [0, 0, 2, 3, 4]


def test_generation_is_deterministic():
    assert _rows(3, 20, seed=1) == _rows(3, 20, seed=1)
    assert _rows(3, 20, seed=1) != _rows(3, 20, seed=2)
    with pytest.raises(ValueError, match="syllo level must be 1..5"):
        syllo.generate(6, 1, seed=0)


def test_split_keys_on_the_set_of_clues():
    prompt = _rows(2, 1)[0]["messages"][0]["content"]
    lines = prompt.split("\n")
    clue_lines = [i for i, line in enumerate(lines) if _CLUE.match(line)]
    reordered = list(lines)
    for i, j in zip(clue_lines, reversed(clue_lines)):
        reordered[i] = lines[j]
    other_bank = re.sub(r"Syllable bank .*", "Syllable bank (1 tiles): zz", "\n".join(reordered))
    assert syllo.split_of(other_bank) == syllo.split_of(prompt)
    assert syllo.problem_key(other_bank) == syllo.problem_key(prompt)
    with pytest.raises(ValueError, match="not a SYLLO prompt"):
        syllo.split_of("Add these binary numbers:\n\n① + ①")


# ---------------------------------------------------------------------------- the gold answer


def test_layouts_are_spread_as_the_old_generator_did_and_fixed_per_problem():
    rows = [row for level in range(1, 6) for row in _rows(level, 400, seed=9)]
    shares = Counter(row["scenario"] for row in rows)
    for layout, percent in syllo.LAYOUTS:
        assert abs(100 * shares[layout] / len(rows) - percent) < 4, shares
    for row in rows[:50]:
        assert row["scenario"] == syllo._layout(syllo.problem_key(row["messages"][0]["content"]))


def test_json_layouts_carry_solutions_inventory_and_analysis():
    rows = [row for level in (1, 5) for row in _rows(level, 80) if row["scenario"].startswith("json")]
    assert {row["scenario"] for row in rows} == {"json", "json-summary-first"}
    for row in rows:
        answer = json.loads(_answer(row))
        first = next(iter(answer))
        assert first == ("analysis" if row["scenario"] == "json-summary-first" else "solutions")
        bank, words = row["puzzle"]["syllables"], row["puzzle"]["answers"]
        used = [tile for s in answer["solutions"] for tile in s["syllables"]]
        unused = list((Counter(bank) - Counter(used)).elements())
        assert answer["solutions"] == [
            {"ans_num": i, "syllables": row["expected"][i - 1].lower().split("·"), "answer": w.upper()}
            for i, w in enumerate(words, 1)]
        inventory = answer["inventory_check"]
        assert inventory["total_tiles"] == len(bank) and inventory["usage"] == dict(Counter(bank))
        assert inventory["used"] == dict(Counter(used)) and sorted(inventory["unused_tiles"]) == sorted(unused)
        assert str(len(bank)) in inventory["status"]
        spans = [len(s["syllables"]) for s in answer["solutions"]]
        assert answer["analysis"] == {"word_count": len(words), "unused_tile_count": len(unused),
                                      "unused_tiles": inventory["unused_tiles"],
                                      "tile_usage_span": f"{min(spans)}-{max(spans)}"}


def test_plain_and_yaml_layouts():
    rows = _rows(3, 80)
    plain = next(r for r in rows if r["scenario"] == "plain")
    first = plain["expected"][0]
    assert _answer(plain).startswith(f"1. {first.replace('·', '')} ({' + '.join(first.lower().split('·'))})\n")
    yaml = next(r for r in rows if r["scenario"] == "yaml")
    assert _answer(yaml).startswith("solutions:\n  - ans_num: 1\n    syllables: [")
    assert "\ninventory_check:\n  total_tiles: " in _answer(yaml) and "\nanalysis:\n  word_count: 6\n" in _answer(yaml)


# ---------------------------------------------------------------------------- judging


@pytest.mark.parametrize("level", range(1, syllo.MAX_LEVEL + 1))
def test_every_layout_round_trips_through_the_scorer(level: int):
    rows = _rows(level, 120)
    assert {row["scenario"] for row in rows} == {name for name, _ in syllo.LAYOUTS}
    for row in rows:
        assert syllo.extract_answer(_answer(row)) == row["expected"]
        assert syllo.is_correct(row["expected"], _answer(row))


EXPECTED = ["O·CEAN", "PEN·CIL", "BA·NA·NA"]
JSON_RIGHT = json.dumps({"solutions": [
    {"ans_num": 1, "syllables": ["o", "cean"], "answer": "OCEAN"},
    {"ans_num": 2, "syllables": ["pen", "cil"], "answer": "PENCIL"},
    {"ans_num": 3, "syllables": ["ba", "na", "na"], "answer": "BANANA"},
]})
PLAIN_RIGHT = "1. OCEAN (o + cean)\n2. PENCIL (pen + cil)\n3. BANANA (ba + na + na)"
YAML_RIGHT = ("solutions:\n  - ans_num: 1\n    syllables: [o, cean]\n    answer: OCEAN\n"
              "  - ans_num: 2\n    syllables: [pen, cil]\n    answer: PENCIL\n"
              "  - ans_num: 3\n    syllables: [ba, na, na]\n    answer: BANANA\nanalysis:\n  word_count: 3")


@pytest.mark.parametrize(("rule", "right", "wrong"), [
    ("the words are the expected ones (JSON)", JSON_RIGHT, JSON_RIGHT.replace("PENCIL", "PENCILS")),
    ("the words are the expected ones (plain)", PLAIN_RIGHT, PLAIN_RIGHT.replace("PENCIL (pen", "PENNIL (pen")),
    ("the words are the expected ones (YAML-like)", YAML_RIGHT, YAML_RIGHT.replace("OCEAN", "OCEANS")),
    ("every word is given: a missing word", PLAIN_RIGHT, PLAIN_RIGHT.rsplit("\n", 1)[0]),
    ("no extra word", PLAIN_RIGHT, PLAIN_RIGHT + "\n4. APPLE (ap + ple)"),
    ("the words are in clue order", PLAIN_RIGHT,
     "1. PENCIL (pen + cil)\n2. OCEAN (o + cean)\n3. BANANA (ba + na + na)"),
    ("the tiles are the bank's: a tile not in the bank",
     JSON_RIGHT, JSON_RIGHT.replace('["o", "cean"]', '["oc", "ean"]')),
    ("the tiles are the bank's: one tile for a whole word", PLAIN_RIGHT, PLAIN_RIGHT.replace("(o + cean)", "(ocean)")),
    ("the tiles spell the word", YAML_RIGHT, YAML_RIGHT.replace("[pen, cil]", "[pen, cel]")),
    ("each clue number once", PLAIN_RIGHT, PLAIN_RIGHT.replace("2. PENCIL", "1. PENCIL")),
    ("a readable answer", PLAIN_RIGHT, "ocean, pencil and banana"),
])
def test_is_correct_rules(rule: str, right: str, wrong: str):
    assert syllo.is_correct(EXPECTED, right), rule
    assert not syllo.is_correct(EXPECTED, wrong), rule


@pytest.mark.parametrize("text", [
    "1. ocean (o + cean)\n2. Pencil (PEN + CIL)\n3. banana (ba + na + na)",  # case is not judged
    "2. PENCIL (pen + cil)\n1. OCEAN (o + cean)\n3. BANANA (ba + na + na)",  # numbered, in any order
    "1. OCEAN\n2. PENCIL\n3. BANANA",  # tiles not named: the words are judged
    "1. OCEAN (o-cean)\n2. PENCIL (pen·cil)\n3. BANANA (ba, na, na)",  # other tile separators
    f"Here is my answer:\n```json\n{JSON_RIGHT}\n```\nDone.",  # JSON inside prose
    json.dumps({"analysis": {"word_count": 3}, "solutions": json.loads(JSON_RIGHT)["solutions"][::-1]}),
])
def test_the_layout_is_not_judged(text: str):
    assert syllo.is_correct(EXPECTED, text)


def test_expected_must_be_the_list_of_words():
    with pytest.raises(TypeError, match="list of answer words"):
        syllo.is_correct("O·CEAN", PLAIN_RIGHT)
    assert syllo.extract_answer("no answer here") is None
