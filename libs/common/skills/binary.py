"""The Binary skill: arithmetic on numbers written in circled binary digits (① = 1, ⓪ = 0).

It decides three things, as pure functions shared by the curriculum (which writes practice
data) and the evaluator (which scores answers):

- what a problem at each difficulty level looks like (`generate`, levels 1..MAX_LEVEL);
- where the answer is in a response (`extract_answer`): the result after the first `=` of
  the first prefix-form line (`add A B = C`, `todecimal A = 35`), or the value of a
  `Final result:` line when the response has one (chained operations);
- whether a response is right (`is_correct`).

The notation follows the seed validation sets of the system Flywheel replaces
(/work/shared/seed-data/README.md). Every problem belongs to exactly one split, decided by a
hash of the problem itself, so the evaluator's held-out suite (split "eval") can never share
a problem with generated training data (split "train"), whatever seeds either side uses.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import Literal

SKILL = "binary"
MAX_LEVEL = 5
ONE, ZERO = "①", "⓪"
OPERATIONS = ("todecimal", "tobinary", "add", "subtract", "multiply", "leftshift", "rightshift")
Split = Literal["train", "eval"]

# One problem in EVAL_BUCKETS goes to the eval split; the rest are training material.
EVAL_BUCKETS = 8
_TO_CIRCLED = str.maketrans("01", ZERO + ONE)
_FROM_CIRCLED = str.maketrans(ZERO + ONE, "01")


def to_circled(value: int) -> str:
    if value < 0:
        raise ValueError(f"circled binary has no sign: {value}")
    return format(value, "b").translate(_TO_CIRCLED)


def from_circled(text: str) -> int:
    text = text.strip()
    if not text or set(text) - {ONE, ZERO}:
        raise ValueError(f"not a circled binary number: {text!r}")
    return int(text.translate(_FROM_CIRCLED), 2)


# ---------------------------------------------------------------------------- problems

# A problem: (scenario, prompt, answer, expected). `key` identifies it for the split.
Problem = tuple[str, str, str, str]


def _bits(rng: random.Random, lo: int, hi: int) -> int:
    """A number with between lo and hi significant bits."""
    width = rng.randint(lo, hi)
    return rng.randrange(1 << (width - 1), 1 << width) if width > 1 else rng.randint(0, 1)


def _binary_op(scenario: str, op: str, sym: str, a: int, b: int, result: int, verb: str) -> Problem:
    ca, cb, cr = to_circled(a), to_circled(b), to_circled(result)
    prompt = f"{verb} these binary numbers:\n\n{ca} {sym} {cb}"
    answer = f"{op} {ca} {cb} = {cr}\n\nVerification: {a} {sym} {b} = {result} ✓"
    return scenario, prompt, answer, cr


def _todecimal(scenario: str, a: int) -> Problem:
    ca = to_circled(a)
    return scenario, f"Convert this binary number to decimal:\n\n{ca}", f"todecimal {ca} = {a}", str(a)


def _tobinary(scenario: str, a: int) -> Problem:
    ca = to_circled(a)
    return scenario, f"Convert this decimal number to binary:\n\n{a}", f"tobinary {a} = {ca}", ca


def _add(scenario: str, a: int, b: int) -> Problem:
    return _binary_op(scenario, "add", "+", a, b, a + b, "Add")


def _subtract(scenario: str, a: int, b: int) -> Problem:
    a, b = max(a, b), min(a, b)  # results stay non-negative: the notation has no sign
    return _binary_op(scenario, "subtract", "-", a, b, a - b, "Subtract")


def _multiply(scenario: str, a: int, b: int) -> Problem:
    return _binary_op(scenario, "multiply", "×", a, b, a * b, "Multiply")


def _shift(scenario: str, a: int, n: int, left: bool) -> Problem:
    ca = to_circled(a)
    result = a << n if left else a >> n
    op, sym = ("leftshift", "<<") if left else ("rightshift", ">>")
    prompt = f"Shift this binary number:\n\n{ca} {sym} {n}"
    return scenario, prompt, f"{op} {ca} {n} = {to_circled(result)}", to_circled(result)


def _chained(scenario: str, a: int, b: int, n: int) -> Problem:
    ca, cb, s = to_circled(a), to_circled(b), a + b
    cs, cr = to_circled(s), to_circled(s << n)
    prompt = f"Perform these operations in sequence:\n\n1. Add {ca} + {cb}\n2. Left shift the result by {n}"
    answer = (
        f"Step 1: add {ca} {cb} = {cs}\n\nStep 2: leftshift {cs} {n} = {cr}\n\n"
        f"Final result: {cr} = {s << n} (decimal)"
    )
    return scenario, prompt, answer, cr


# Each level: the problem makers it draws from, uniformly. Difficulty rises with the number
# of bits and the kind of operation.
_LEVELS: dict[int, tuple[Callable[[random.Random], Problem], ...]] = {
    1: (
        lambda r: _todecimal("todecimal-small", _bits(r, 1, 5)),
        lambda r: _add("add-basic", _bits(r, 1, 4), _bits(r, 1, 4)),
    ),
    2: (
        lambda r: _add("add-basic", _bits(r, 3, 8), _bits(r, 3, 8)),
        lambda r: _subtract("subtract-basic", _bits(r, 3, 8), _bits(r, 3, 8)),
        lambda r: _todecimal("todecimal-medium", _bits(r, 5, 8)),
    ),
    3: (
        lambda r: _multiply("multiply-small", _bits(r, 2, 4), _bits(r, 2, 4)),
        lambda r: _add("add-carry-propagation", _bits(r, 8, 10), _bits(r, 8, 10)),
        lambda r: _tobinary("tobinary-small", _bits(r, 4, 8)),
        lambda r: _shift("leftshift-basic", _bits(r, 3, 8), r.randint(1, 3), left=True),
        lambda r: _shift("rightshift-basic", _bits(r, 4, 8), r.randint(1, 3), left=False),
    ),
    4: (
        lambda r: _add("add-large", _bits(r, 12, 16), _bits(r, 12, 16)),
        lambda r: _subtract("subtract-large", _bits(r, 12, 16), _bits(r, 12, 16)),
        lambda r: _multiply("multiply-large", _bits(r, 6, 9), _bits(r, 4, 7)),
        lambda r: _todecimal("todecimal-large", _bits(r, 10, 14)),
    ),
    5: (
        lambda r: _chained("chained-add-shift", _bits(r, 4, 10), _bits(r, 4, 10), r.randint(1, 3)),
    ),
}
assert set(_LEVELS) == set(range(1, MAX_LEVEL + 1))


def split_of(prompt: str) -> Split:
    """The split a problem belongs to, fixed by its prompt alone."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def generate(level: int, n: int, seed: int, *, split: Split = "train") -> list[dict]:
    """`n` chat rows at `level`, deterministic in (level, n, seed, split).

    The eval split holds distinct problems (a suite item never repeats); training rows may
    repeat, as small levels have few distinct problems.
    """
    if level not in _LEVELS:
        raise ValueError(f"binary level must be 1..{MAX_LEVEL}, got {level}")
    rng = random.Random(f"{SKILL}:{split}:{level}:{seed}")
    makers = _LEVELS[level]
    rows: list[dict] = []
    seen: set[str] = set()
    # Generous: the eval split keeps ~1 problem in 8, and small levels repeat often.
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            return rows
        scenario, prompt, answer, expected = rng.choice(makers)(rng)
        if split_of(prompt) != split or (split == "eval" and prompt in seen):
            continue
        seen.add(prompt)
        rows.append({
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "skill": SKILL,
            "level": level,
            "scenario": scenario,
            "expected": expected,
        })
    raise ValueError(f"level {level} has too few distinct {split} problems for {n} rows")


# ---------------------------------------------------------------------------- answers

_PREFIX_LINE = re.compile(rf"^\s*(?:Step \d+:\s*)?(?:{'|'.join(OPERATIONS)})\b[^=\n]*=([^\n]*)$", re.MULTILINE)
_FINAL_LINE = re.compile(r"^\s*Final result:([^=\n]*)", re.MULTILINE)
# Decorations that may follow a result on its line: "(51)", "(decimal)", "✓".
_TRAILER = re.compile(r"\s*(\(.*\)|✓)\s*$")


def _normalise(text: str) -> str | None:
    text = text.strip()
    while (trimmed := _TRAILER.sub("", text)) != text:
        text = trimmed
    text = " ".join(text.split())
    return text or None


def extract_answer(text: str) -> str | None:
    """The answer a response states, whitespace-normalised; None when it states none."""
    if final := _FINAL_LINE.search(text):
        return _normalise(final.group(1))
    if prefix := _PREFIX_LINE.search(text):
        return _normalise(prefix.group(1))
    return None


def is_correct(expected: str, text: str) -> bool:
    return extract_answer(text) == _normalise(expected)
