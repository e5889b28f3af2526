"""The SYLLO skill: syllable-tile word puzzles.

A puzzle lists clues, each a short definition after one blank slot per syllable
(`___ ___ — a vast body of salt water`), and a shuffled bank of syllable tiles joined by ` | `:
every tile of every answer, plus, from level 3 on, red-herring tiles that belong to no answer
(the prompt says how many). The solver builds each answer from the tiles. Levels:

    level  words  syllables a word  red herrings
    1      4      2                 0
    2      5      2–3               0
    3      6      2–3               2
    4      7      2–4               3
    5      8      3–4               4

Words, their tiles and clues come from data/syllo_words.json (kept in the repo: no download at
run time). A problem is its set of clues (so its set of words), whatever the order, the tiles'
shuffle or the red herrings; its facts are its words, and a puzzle that asks for a held-out
word is a held-out item (`split_of`, the shared rule of skill.py).

The gold answer is one JSON object: `solutions` (per clue `ans_num` from 1, the ordered
`syllables`, the UPPERCASE `answer`), `inventory_check` (`total_tiles`, `usage` tile → count in
the bank, `used` tile → count used, `unused_tiles`, `status`) and `analysis` (`word_count`,
`unused_tile_count`, `unused_tiles`, `tile_usage_span`: the fewest and most tiles an answer
uses, "2-3"). So that a model does not overfit one layout, the gold answer is laid out, chosen
by a hash of the problem, as JSON (40%), JSON with the summary first (20%), plain text
`1. OCEAN (o + cean)` (25%) or YAML-like (15%); the row's scenario names the layout.

Scoring judges the words, not the layout. `extract_answer` reads the solutions of any of the
four layouts, in `ans_num` order, as words with their tiles ("O·CEAN", or "OCEAN" where the
response names no tiles); a solution whose tiles do not spell its word makes the response
unreadable. `expected` is the ordered list of answer words written with their tiles, so a
saved suite is judged the same even if the word list changes later. A response is right when
it names exactly the expected words, in clue order, each with the expected tiles where it
names tiles — tiles of the answers are the bank less its red herrings, so this is also the
check that only bank tiles are used, and no red herring.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.skills.skill import Facts, Problem, SkillModule, Split, draw_rows, held_out, split_from_facts

SKILL = "syllo"
MAX_LEVEL = 5
WORDS_PATH = Path(__file__).parent / "data" / "syllo_words.json"
TILE_MARK = "·"  # between the tiles of a word in `expected`: "O·CEAN"


@dataclass(frozen=True)
class Word:
    word: str
    syllables: tuple[str, ...]
    clue: str


@dataclass(frozen=True)
class Level:
    words: int
    syllables: tuple[int, ...]  # the syllable counts a word may have
    red_herrings: int


LEVELS: dict[int, Level] = {
    1: Level(4, (2,), 0),
    2: Level(5, (2, 3), 0),
    3: Level(6, (2, 3), 2),
    4: Level(7, (2, 3, 4), 3),
    5: Level(8, (3, 4), 4),
}
assert set(LEVELS) == set(range(1, MAX_LEVEL + 1))

# The gold answer's layouts and their shares (percent) of problems.
LAYOUTS: tuple[tuple[str, int], ...] = (("json", 40), ("json-summary-first", 20), ("plain", 25), ("yaml", 15))


def load_words(path: Path = WORDS_PATH) -> tuple[Word, ...]:
    """The word list, checked: lowercase words, tiles that spell them, unique words and clues."""
    words = tuple(
        Word(entry["word"], tuple(entry["syllables"]), entry["clue"]) for entry in json.loads(path.read_text())["words"]
    )
    for w in words:
        if not re.fullmatch(r"[a-z]+", w.word) or "".join(w.syllables) != w.word or not all(w.syllables):
            raise ValueError(f"{path}: {w.word!r}: the tiles {w.syllables} must spell the lowercase word")
        if not w.clue or w.word in w.clue.lower():
            raise ValueError(f"{path}: {w.word!r}: the clue must be non-empty and must not contain the word")
    for what, values in (("word", [w.word for w in words]), ("clue", [w.clue for w in words])):
        if repeated := [v for v, count in Counter(values).items() if count > 1]:
            raise ValueError(f"{path}: repeated {what}s: {repeated[:5]}")
    return words


WORDS = load_words()
_TILES = tuple(sorted({tile for w in WORDS for tile in w.syllables}))

# ---------------------------------------------------------------------------- problems


def _prompt(words: Sequence[Word], bank: Sequence[str], red_herrings: int) -> str:
    clues = "\n".join(f"{i}. {' '.join('___' for _ in w.syllables)} — {w.clue}" for i, w in enumerate(words, 1))
    many = red_herrings > 1
    herrings = (f"{red_herrings} tile{'s' if many else ''} in the bank belong{'' if many else 's'} to no answer."
                if red_herrings else "none; every tile belongs to an answer.")
    return (
        "Solve this SYLLO puzzle: build one English word for each clue from the syllable tiles in the bank.\n\n"
        "Rules:\n"
        "- Each clue shows one blank (___) per syllable tile of its answer.\n"
        "- Use only tiles from the bank, each at most as many times as it appears there.\n"
        "- Every tile belongs to exactly one answer, except the red herrings, which belong to none.\n\n"
        f"Clues:\n{clues}\n\n"
        f"Red herrings: {herrings}\n\n"
        f"Syllable bank ({len(bank)} tiles): {' | '.join(bank)}\n\n"
        'Answer with one JSON object: "solutions" (for each clue: "ans_num" from 1, its "syllables" in order, '
        'the "answer" in UPPERCASE), "inventory_check" ("total_tiles", "usage": tile to count in the bank, '
        '"used": tile to count used, "unused_tiles", "status") and "analysis" ("word_count", '
        '"unused_tile_count", "unused_tiles", "tile_usage_span").'
    )


def _layout(key: str) -> str:
    """The gold answer's layout for a problem: fixed by the problem, spread as LAYOUTS says."""
    point = int.from_bytes(hashlib.sha256(f"syllo-layout:{key}".encode()).digest()[:4], "big") % 100
    for name, share in LAYOUTS:
        if point < share:
            return name
        point -= share
    raise AssertionError("LAYOUTS shares must add up to 100")


def _answer(words: Sequence[Word], bank: Sequence[str], layout: str) -> str:
    used = [tile for w in words for tile in w.syllables]
    unused = sorted((Counter(bank) - Counter(used)).elements(), key=bank.index)
    spans = [len(w.syllables) for w in words]
    status = (f"{len(used)} of {len(bank)} tiles used; {len(unused)} red herring{'s' if len(unused) > 1 else ''} "
              f"left over ({', '.join(unused)})." if unused else f"All {len(bank)} tiles used; none left over.")
    solutions = [{"ans_num": i, "syllables": list(w.syllables), "answer": w.word.upper()}
                 for i, w in enumerate(words, 1)]
    inventory = {"total_tiles": len(bank), "usage": dict(Counter(bank)), "used": dict(Counter(used)),
                 "unused_tiles": unused, "status": status}
    analysis = {"word_count": len(words), "unused_tile_count": len(unused), "unused_tiles": unused,
                "tile_usage_span": f"{min(spans)}-{max(spans)}"}
    if layout == "plain":
        lines = [f"{i}. {w.word.upper()} ({' + '.join(w.syllables)})" for i, w in enumerate(words, 1)]
        left = f"unused: {', '.join(unused)}." if unused else "none unused."
        return "\n".join(lines) + f"\n\nTiles: {len(bank)} in the bank, {len(used)} used; {left}"
    if layout == "yaml":
        return _yaml_like({"solutions": solutions, "inventory_check": inventory, "analysis": analysis})
    parts = {"solutions": solutions, "inventory_check": inventory, "analysis": analysis}
    order = ("analysis", "inventory_check", "solutions") if layout == "json-summary-first" else tuple(parts)
    return _json_object({name: parts[name] for name in order})


def _json_object(parts: dict[str, Any]) -> str:
    """Valid JSON, one solution a line, so that long puzzles stay readable and short."""
    def value(name: str, v: Any) -> str:
        if name == "solutions":
            return "[\n" + ",\n".join(f"    {json.dumps(s, ensure_ascii=False)}" for s in v) + "\n  ]"
        return json.dumps(v, ensure_ascii=False)

    return "{\n" + ",\n".join(f'  "{name}": {value(name, v)}' for name, v in parts.items()) + "\n}"


def _yaml_like(parts: dict[str, Any]) -> str:
    def flow(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(map(str, v)) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {n}" for k, n in v.items()) + "}"
        return str(v)

    lines = ["solutions:"]
    for s in parts["solutions"]:
        lines += [f"  - ans_num: {s['ans_num']}", f"    syllables: {flow(s['syllables'])}",
                  f"    answer: {s['answer']}"]
    for name in ("inventory_check", "analysis"):
        lines += [f"{name}:", *(f"  {k}: {flow(v)}" for k, v in parts[name].items())]
    return "\n".join(lines)


def _expected(words: Iterable[Word]) -> list[str]:
    return [TILE_MARK.join(w.syllables).upper() for w in words]


def _maker(level: int):
    spec = LEVELS[level]
    pool = [w for w in WORDS if len(w.syllables) in spec.syllables]

    def make(rng: random.Random) -> Problem:
        words = rng.sample(pool, spec.words)
        tiles = [tile for w in words for tile in w.syllables]
        herrings: list[str] = []
        while len(herrings) < spec.red_herrings:
            tile = rng.choice(_TILES)
            if tile not in tiles and tile not in herrings:
                herrings.append(tile)
        bank = tiles + herrings
        rng.shuffle(bank)
        prompt = _prompt(words, bank, spec.red_herrings)
        layout = _layout(problem_key(prompt))
        puzzle = {"syllables": bank, "answers": [w.word for w in words], "difficulty": level}
        return Problem(layout, prompt, _answer(words, bank, layout), _expected(words), {"puzzle": puzzle})

    return make


_CLUE_LINE = re.compile(r"^[ \t]*\d+\.[ \t]+(?:___[ \t]*)+—[ \t]*(.+?)[ \t]*$", re.MULTILINE)


# A word is held out at 2 of HOLD_OUT_BUCKETS (1/8): a puzzle that asks for one is a held-out
# item; a training puzzle asks for none (575 words: about 72 held out).
WORD_SHARE = 2
_WORD_OF_CLUE = {" ".join(w.clue.split()): w.word for w in WORDS}


def facts_of(prompt: str) -> Facts:
    """The facts of the puzzle `prompt` poses: its words (a clue not in the word list stands for itself)."""
    clues = sorted(" ".join(clue.split()) for clue in _CLUE_LINE.findall(prompt))
    if not clues:
        raise ValueError(f"not a SYLLO prompt (no clue lines like `1. ___ ___ — clue`): {prompt[:80]!r}")
    words = frozenset(f"syllo word {_WORD_OF_CLUE.get(clue, clue)}" for clue in clues)
    return Facts("\n".join(clues), words, words)


def is_held_out(fact: str) -> bool:
    return held_out(fact, WORD_SHARE)


def problem_key(prompt: str) -> str:
    """What the puzzle is: its set of clues, whatever their order, the bank's shuffle or the red herrings."""
    return facts_of(prompt).key


def split_of(prompt: str) -> Split | None:
    """The split a puzzle belongs to: eval when it asks for a held-out word, else train."""
    return split_from_facts(facts_of(prompt), is_held_out)


def generate(level: int, n: int, seed: int, split: Split = "train", exclude: Collection[str] = ()) -> list[dict]:
    """`n` chat rows at `level`, deterministic in (level, n, seed, split).

    Each row also carries `puzzle` ({"syllables": the bank, "answers": the words, "difficulty":
    the level}), the form the gatekeeper's syllo_v1 schema takes.
    """
    if level not in LEVELS:
        raise ValueError(f"syllo level must be 1..{MAX_LEVEL}, got {level}")
    return draw_rows(SKILL, level, n, seed, split, _maker(level), facts_of,
                     lambda facts: split_from_facts(facts, is_held_out), exclude)


# ---------------------------------------------------------------------------- answers

# (ans_num or None, the word, its tiles or None) as a response states them.
Stated = tuple[int | None, str, tuple[str, ...] | None]
_LETTERS = re.compile(r"[A-Za-z]+")
_TILE_SEPARATORS = re.compile(rf"[+,|/{TILE_MARK}-]")
_PLAIN_LINE = re.compile(r"^[ \t]*(\d+)[.)][ \t]+([A-Za-z]+)\b(?:[ \t]*\(([^)\n]*)\))?", re.MULTILINE)
_YAML_ITEM = re.compile(r"^[ \t]*-[ \t]+(.*)$")


def _tiles(value: Any) -> tuple[str, ...] | None:
    """A solution's tiles from a JSON list or a YAML-like flow list "[o, cean]"; None if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip(" '\"") for part in value.strip().strip("[]").split(",")]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        return ()  # unreadable: fails the spelling check
    return tuple(value)


def _number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _from_json(text: str) -> list[Stated] | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("solutions"), list):
            return [
                (_number(s.get("ans_num")), str(s.get("answer", "")), _tiles(s.get("syllables")))
                if isinstance(s, dict) else (None, "", ())
                for s in obj["solutions"]
            ]
    return None


def _from_yaml_like(text: str) -> list[Stated] | None:
    start = re.search(r"^solutions:[ \t]*$", text, re.MULTILINE)
    if start is None:
        return None
    items: list[dict[str, str]] = []
    for line in text[start.end():].splitlines():
        if not line.strip():
            continue
        item = _YAML_ITEM.match(line)
        if not line[0].isspace() and item is None:
            break  # the next top-level key
        if item:
            items.append({})
        elif not items:
            return None
        key, sep, value = (item.group(1) if item else line).partition(":")
        if sep:
            items[-1][key.strip()] = value.strip()
    return [(_number(i.get("ans_num")), i.get("answer", "").strip(" '\""), _tiles(i.get("syllables"))) for i in items]


def _from_plain(text: str) -> list[Stated] | None:
    found = _PLAIN_LINE.findall(text)
    if not found:
        return None
    return [(int(number), word, tuple(t.strip() for t in _TILE_SEPARATORS.split(tiles)) if tiles else None)
            for number, word, tiles in found]


def _solutions(text: str) -> list[tuple[str, tuple[str, ...] | None]] | None:
    """The (WORD, its lowercase tiles or None) a response gives, in clue order; None when unreadable."""
    entries = next((found for read in (_from_json, _from_yaml_like, _from_plain) if (found := read(text)) is not None),
                   None)
    if not entries:
        return None
    numbers = [number for number, _, _ in entries]
    if all(number is None for number in numbers):
        numbers = list(range(1, len(entries) + 1))
    if sorted(n if n is not None else 0 for n in numbers) != list(range(1, len(entries) + 1)):
        return None  # numbers missing, repeated or out of range
    solutions = []
    for _, (_, word, tiles) in sorted(zip(numbers, entries), key=lambda pair: pair[0]):
        if not _LETTERS.fullmatch(word):
            return None
        if tiles is not None and (not all(_LETTERS.fullmatch(t) for t in tiles)
                                  or "".join(tiles).lower() != word.lower()):
            return None  # tiles that do not spell the word
        solutions.append((word.upper(), tuple(t.lower() for t in tiles) if tiles is not None else None))
    return solutions


def extract_answer(text: str) -> list[str] | None:
    """The words a response gives, in clue order, with their tiles ("O·CEAN"); None when unreadable."""
    solutions = _solutions(text)
    if solutions is None:
        return None
    return [TILE_MARK.join(tiles).upper() if tiles else word for word, tiles in solutions]


def is_correct(expected: list[str], text: str) -> bool:
    if isinstance(expected, str):
        raise TypeError("SYLLO's expected value is the list of answer words, not a string")
    solutions = _solutions(text)
    if solutions is None or len(solutions) != len(expected):
        return False
    for (word, tiles), want in zip(solutions, expected):
        want_tiles = tuple(want.lower().split(TILE_MARK))
        if word != "".join(want_tiles).upper() or (tiles is not None and tiles != want_tiles):
            return False
    return True


SYLLO = SkillModule(SKILL, MAX_LEVEL, generate, facts_of, is_held_out, extract_answer, is_correct)
