"""The Binary skill: arithmetic on numbers written in circled binary digits (① = 1, ⓪ = 0).

It decides, as pure functions shared by the curriculum and the evaluator:

- what a problem at each level looks like (`generate`, levels 1..MAX_LEVEL, see LEVELS);
- which split a problem belongs to (`split_of`: the shared rule of skill.py, keyed by the
  prompt, which states the problem and nothing else: one wording per operation);
- what answer a response states (`extract_answer`) and whether it is right (`is_correct`).

Levels follow the curriculum of the system Flywheel replaces: 7 levels by operand magnitude,
from 1–10 up to 10K–100K, with the operations growing alongside:

    level  operands        operations
    1      1–31            todecimal, tobinary, add
    2      10–100          + subtract
    3      100–500         + leftshift, rightshift (by 1–4)
    4      500–1K          + multiply (by a number of level 1's size)
    5      1K–5K           + chained: add, then shift left
    6      5K–10K          + chained: add, shift left, shift right
    7      10K–100K        all of them

Level 1 reaches 31 (5 bits) rather than 10: numbers up to 10 make only 120 distinct problems,
too few for the 1-in-8 eval split to hold a suite; up to 31 they make 1,023 (about 128 eval).

Answers are in the notation of the old system's validation sets (tests/data/seed_binary): a
prefix-form statement `add A B = C`, `todecimal A = 35`, `tobinary 35 = A`, `leftshift A 2 = C`;
from level 2 on a one-line decimal `Verification:`; chained problems as `Step n:` statements
ending with `Final result: X = d (decimal)`. At level 1 the answer is that single statement,
so the first line carries the result.

Reading a response (`extract_answer`): the value of its `Final result:` line if it has one,
else the result of its first prefix-form statement, else (the seed sets' power-of-two
questions) the options it calls a power of 2 ("A", or "A, C"). A response is right
(`is_correct`) when that answer equals the expected one and every checkable claim it makes
holds: each prefix-form statement is true arithmetic in the right notation (so a miscopied
operand or a dropped result is wrong even when the final number is right), and each
`circled = decimal` equation is true. Decimal verification arithmetic is not judged. (The
scorer sees the response and the expected result, not the prompt: a miscopied operand bit that
a right shift drops leaves a true statement with the right result, and passes.)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from libs.common.skills.skill import Facts, Problem, SkillModule, Split, draw_rows, held_out, split_from_facts

SKILL = "binary"
MAX_LEVEL = 7
ONE, ZERO = "①", "⓪"
OPERATIONS = ("todecimal", "tobinary", "add", "subtract", "multiply", "leftshift", "rightshift")

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


# ---------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class Level:
    low: int  # operands are drawn uniformly from low..high
    high: int
    kinds: tuple[str, ...]  # the problem kinds drawn, uniformly


_SHIFTS = ("leftshift", "rightshift")
# Answered worked through decimal (`_worked_answer`); the rest state the result at once.
_WORKED = ("add", "subtract")
_L1 = ("todecimal", "tobinary", "add")
_L2 = (*_L1, "subtract")
_L3 = (*_L2, *_SHIFTS)
_L4 = (*_L3, "multiply")
_L5 = (*_L4, "chained-add-shift")
_L6 = (*_L5, "chained-add-shift-shift")
LEVELS: dict[int, Level] = {
    1: Level(1, 31, _L1),
    2: Level(10, 100, _L2),
    3: Level(100, 500, _L3),
    4: Level(500, 1_000, _L4),
    5: Level(1_000, 5_000, _L5),
    6: Level(5_000, 10_000, _L6),
    7: Level(10_000, 100_000, _L6),
}
assert set(LEVELS) == set(range(1, MAX_LEVEL + 1))
# A multiplier is kept to level 1's size: the product of two level-7 numbers would be 34 bits.
_MULTIPLIER = LEVELS[1]
_SHIFT_BY = (1, 4)

# ---------------------------------------------------------------------------- problems
# One wording per kind: the prompt is the problem, so the split can key on it.


def _todecimal(a: int) -> Problem:
    ca = to_circled(a)
    return Problem("todecimal", f"Convert this binary number to decimal:\n\n{ca}", f"todecimal {ca} = {a}", str(a))


def _tobinary(a: int) -> Problem:
    ca = to_circled(a)
    return Problem("tobinary", f"Convert this decimal number to binary:\n\n{a}", f"tobinary {a} = {ca}", ca)


def _arithmetic(kind: str, a: int, b: int, verified: bool) -> Problem:
    if kind == "subtract":
        a, b = max(a, b), min(a, b)  # results stay non-negative: the notation has no sign
    verb, sym, result = {
        "add": ("Add", "+", a + b), "subtract": ("Subtract", "-", a - b), "multiply": ("Multiply", "×", a * b),
    }[kind]
    ca, cb, cr = to_circled(a), to_circled(b), to_circled(result)
    prompt = f"{verb} these binary numbers:\n\n{ca} {sym} {cb}"
    if kind in _WORKED:
        return Problem(kind, prompt, _worked_answer(ca, cb, sym, a, b, result), cr)
    answer = f"{kind} {ca} {cb} = {cr}"
    if verified:
        answer += f"\n\nVerification: {a} {sym} {b} = {result} ✓"
    return Problem(kind, prompt, answer, cr)


# Column names for the digit-by-digit decimal step; level 7's largest operand has 6 digits.
_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")


def _columns(x: int, y: int, sym: str) -> str:
    """`x sym y` (x >= y) computed column by column, ones first, as people do on paper.

    Every column adds (or subtracts) single digits and the carry (borrow) from the column
    before, always written, so each column is one fact from a 200-entry table: "28 + 19:
    ones 8 + 9 = 17, tens 2 + 1 + 1 = 4, total 47". A borrow shows as the 10 added to the
    upper digit: "412 - 397: ones 12 - 7 = 5, tens 11 - 9 - 1 = 1, hundreds 4 - 3 - 1 = 0,
    total 15". The last column of a sum keeps its carry: "95 + 17: ..., tens 9 + 1 + 1 = 11,
    total 112".
    """
    xs, ys = str(x)[::-1], str(y)[::-1]
    columns, digits, carry = [], [], 0
    for k, ch in enumerate(xs):
        dx, dy = int(ch), int(ys[k]) if k < len(ys) else 0
        carried = f" {sym} {carry}" if k else ""
        if sym == "+":
            value = dx + dy + carry
            columns.append(f"{_PLACES[k]} {dx} + {dy}{carried} = {value}")
            carry = value // 10
            digits.append(str(value) if k == len(xs) - 1 else str(value % 10))
        else:
            upper = dx + 10 if dx - dy - carry < 0 else dx
            value = upper - dy - carry
            columns.append(f"{_PLACES[k]} {upper} - {dy}{carried} = {value}")
            carry = 1 if upper > dx else 0
            digits.append(str(value))
    return f"{x} {sym} {y}: " + ", ".join(columns) + f", total {int(''.join(reversed(digits)))}"


def _worked_answer(ca: str, cb: str, sym: str, a: int, b: int, result: int) -> str:
    """Addition and subtraction worked through decimal: convert, compute by columns, convert back.

    Every line is in the notation (prefix-form statements, a decimal line, the chained
    problems' `Final result:`), and every claim is checked by `is_correct`. A small model
    learns the parts separately, each from every problem it sees, where the one-line
    `add A B = C` asks it to learn carries through binary digits from a few hundred examples.
    The decimal step goes column by column (`_columns`): written whole ("28 + 19 = 47") it was
    the step the tiny model got wrong (measured in the README's "Making the model learn"). A
    sum is written larger term first, as people add: 11 + 18 and 18 + 11 are the same fact.
    """
    x, y = (max(a, b), min(a, b)) if sym == "+" else (a, b)
    return (
        f"Step 1: todecimal {ca} = {a}\n"
        f"Step 2: todecimal {cb} = {b}\n"
        f"Step 3: {_columns(x, y, sym)}\n"
        f"Step 4: tobinary {result} = {to_circled(result)}\n\n"
        f"Final result: {to_circled(result)} = {result} (decimal)"
    )


def _shift(kind: str, a: int, n: int, verified: bool) -> Problem:
    ca = to_circled(a)
    left = kind == "leftshift"
    result = a << n if left else a >> n
    answer = f"{kind} {ca} {n} = {to_circled(result)}"
    if verified:
        check = f"{a} × {1 << n} = {result}" if left else f"{a} ÷ {1 << n} = {result} (integer division)"
        answer += f"\n\nVerification: {check} ✓"
    return Problem(kind, f"Shift this binary number:\n\n{ca} {'<<' if left else '>>'} {n}", answer, to_circled(result))


def _chained(a: int, b: int, shifts: list[tuple[str, int]]) -> Problem:
    """Add, then shift the result in turn by each of `shifts` ("leftshift"/"rightshift", n)."""
    ca, cb, value = to_circled(a), to_circled(b), a + b
    lines = [f"1. Add {ca} + {cb}"]
    steps = [f"Step 1: add {ca} {cb} = {to_circled(value)} ({value})"]
    for number, (kind, n) in enumerate(shifts, start=2):
        lines.append(f"{number}. {'Left' if kind == 'leftshift' else 'Right'} shift the result by {n}")
        before, value = value, value << n if kind == "leftshift" else value >> n
        steps.append(f"Step {number}: {kind} {to_circled(before)} {n} = {to_circled(value)} ({value})")
    prompt = "Perform these operations in sequence:\n\n" + "\n".join(lines)
    answer = "\n\n".join(steps) + f"\n\nFinal result: {to_circled(value)} = {value} (decimal)"
    scenario = "chained-add-" + "-".join("shift" for _ in shifts)
    return Problem(scenario, prompt, answer, to_circled(value))


def _maker(level: int) -> Callable[[random.Random], Problem]:
    spec = LEVELS[level]
    verified = level > 1  # level 1 answers are one statement: the first line carries the result

    def number(rng: random.Random) -> int:
        return rng.randint(spec.low, spec.high)

    def shift_by(rng: random.Random) -> int:
        return rng.randint(*_SHIFT_BY)

    def make(rng: random.Random) -> Problem:
        kind = rng.choice(spec.kinds)
        if kind == "todecimal":
            return _todecimal(number(rng))
        if kind == "tobinary":
            return _tobinary(number(rng))
        if kind in ("add", "subtract"):
            return _arithmetic(kind, number(rng), number(rng), verified)
        if kind == "multiply":
            return _arithmetic(kind, number(rng), rng.randint(_MULTIPLIER.low + 1, _MULTIPLIER.high), verified)
        if kind in _SHIFTS:
            return _shift(kind, number(rng), shift_by(rng), verified)
        if kind == "chained-add-shift":
            return _chained(number(rng), number(rng), [("leftshift", shift_by(rng))])
        return _chained(number(rng), number(rng), [("leftshift", shift_by(rng)), ("rightshift", shift_by(rng))])

    return make


# ---------------------------------------------------------------------------- what a problem is
# A problem is read back from its prompt (ours, or another wording of the same problem: the old
# system's "Add these two binary numbers using ⓪① notation: A + B"), so that the split of a
# submitted row is decided exactly as a generated one's.

# Held-out shares of HOLD_OUT_BUCKETS (16). A number is stated by nearly every problem it occurs
# in (as an operand, a result, a step's value): holding out one costs every problem that
# touches it, so numbers are held out at 1/16; an operation on its operands (a sum, a shift) is
# one problem's own fact, held out at 1/4 so that level 1 (31 numbers) holds enough
# held-out sums for a selection suite and a sealed test of 48 items each.
NUMBER_SHARE = 1
OPERATION_SHARE = 4

_C = f"[{ONE}{ZERO}]+"
_EXPRESSION = re.compile(rf"({_C})\s*([+×*x-])\s*({_C})")
_SHIFT_EXPRESSION = re.compile(rf"({_C})\s*(<<|>>)\s*([0-9]+)")
_SHIFT_SHOWN = re.compile(rf"Original:\s*({_C})\s*Shift left by:\s*([0-9]+)")
_CHAIN_ADD = re.compile(rf"^\s*1\.\s*Add\s+({_C})\s*\+\s*({_C})\s*$", re.MULTILINE)
_CHAIN_SHIFT = re.compile(r"^\s*\d+\.\s*(Left|Right) shift the result by ([0-9]+)\s*$", re.MULTILINE)
_SYMBOLS = {"+": "add", "-": "subtract", "×": "multiply", "*": "multiply", "x": "multiply"}


def _number(n: int) -> str:
    return f"binary number {n}"


def _operation(kind: str, a: int, b: int) -> str:
    if kind in ("add", "multiply"):  # commutative: the order the operands are written in is wording
        a, b = min(a, b), max(a, b)
    return f"binary {kind} {a} {b}"


def facts_of(prompt: str) -> Facts:
    """The facts of the Binary problem `prompt` poses; ValueError when it poses none."""
    if chain := _CHAIN_ADD.search(prompt):
        a, b = from_circled(chain.group(1)), from_circled(chain.group(2))
        steps, numbers, value = [_operation("add", a, b)], {a, b, a + b}, a + b
        for direction, by in _CHAIN_SHIFT.findall(prompt):
            kind, n = ("leftshift", int(by)) if direction == "Left" else ("rightshift", int(by))
            steps.append(_operation(kind, value, n))
            value = value << n if kind == "leftshift" else value >> n
            numbers.add(value)
        return Facts("binary chain " + "; ".join(steps), frozenset(steps),
                     frozenset(steps) | {_number(x) for x in numbers})
    shift = _SHIFT_EXPRESSION.search(prompt)
    if shift or (shown := _SHIFT_SHOWN.search(prompt)):
        a, op, n = shift.groups() if shift else (shown.group(1), "<<", shown.group(2))
        a, n, kind = from_circled(a), int(n), "rightshift" if op == ">>" else "leftshift"
        result = a >> n if kind == "rightshift" else a << n
        operation = _operation(kind, a, n)
        return Facts(operation, frozenset({operation}), frozenset({operation, _number(a), _number(result)}))
    if expression := _EXPRESSION.search(prompt):
        a, sym, b = from_circled(expression.group(1)), expression.group(2), from_circled(expression.group(3))
        kind = _SYMBOLS[sym]
        if kind == "subtract":
            a, b = max(a, b), min(a, b)
        result = {"add": a + b, "subtract": a - b, "multiply": a * b}[kind]
        operation = _operation(kind, a, b)
        return Facts(operation, frozenset({operation}),
                     frozenset({operation, _number(a), _number(b), _number(result)}))
    lowered = prompt.lower()
    if "to decimal" in lowered and (circled := re.search(_C, prompt)):
        number = _number(from_circled(circled.group(0)))
        return Facts(number, frozenset({number}), frozenset({number}))
    if "to binary" in lowered and (decimal := re.search(r"(?<![0-9])[0-9]+(?![0-9])", prompt.split(":")[-1])):
        number = _number(int(decimal.group(0)))
        return Facts(number, frozenset({number}), frozenset({number}))
    raise ValueError(f"not a Binary problem: {prompt[:80]!r}")


def is_held_out(fact: str) -> bool:
    return held_out(fact, NUMBER_SHARE if fact.startswith("binary number ") else OPERATION_SHARE)


def problem_key(prompt: str) -> str:
    """What the problem `prompt` poses is, whatever its wording and operand order."""
    return facts_of(prompt).key


def split_of(prompt: str) -> Split | None:
    """The split a problem belongs to (None: neither), fixed by what it is."""
    return split_from_facts(facts_of(prompt), is_held_out)


def generate(level: int, n: int, seed: int, split: Split = "train", exclude: Collection[str] = ()) -> list[dict]:
    """`n` chat rows at `level`, deterministic in (level, n, seed, split, exclude).

    The eval split holds distinct problems (a suite item never repeats); training rows may
    repeat, as small levels have few distinct problems.
    """
    if level not in LEVELS:
        raise ValueError(f"binary level must be 1..{MAX_LEVEL}, got {level}")
    return draw_rows(SKILL, level, n, seed, split, _maker(level), facts_of,
                     lambda facts: split_from_facts(facts, is_held_out), exclude)


# ---------------------------------------------------------------------------- answers

_CIRCLED = f"[{ONE}{ZERO}]+"
_STATEMENT = re.compile(rf"^[ \t]*(?:Step \d+:[ \t]*)?({'|'.join(OPERATIONS)})[ \t]+([^=\n]*)=([^\n]*)$", re.MULTILINE)
_FINAL_LINE = re.compile(r"^[ \t]*Final result:([^=\n]*)", re.MULTILINE)
_EQUATION = re.compile(rf"({_CIRCLED})[ \t]*=[ \t]*([0-9]+)(?![0-9.^])")
# The worked answers' decimal step: "28 + 19: ones 8 + 9 = 17, tens 2 + 1 + 1 = 4, total 47".
_DECIMAL_STEP = re.compile(r"^[ \t]*(?:Step \d+:[ \t]*)?([0-9]+) ([+-]) ([0-9]+):[^\n]*\btotal ([0-9]+)[ \t]*$", re.MULTILINE)
# Decorations that may follow a result on its line: "(51)", "(decimal)", "✓".
_TRAILER = re.compile(r"\s*(\(.*\)|✓)\s*$")
# The seed sets' power-of-two questions: option blocks "A) ..." and the verdict in each.
_OPTION = re.compile(r"^[ \t]*([A-Z])\)", re.MULTILINE)
_IS_POWER = re.compile(r"\bIS a power of 2\b")
# The operand notation of each operation: C circled, D decimal; and of its result.
_SIGNATURES = {
    "todecimal": ("C", "D"), "tobinary": ("D", "C"),
    "add": ("CC", "C"), "subtract": ("CC", "C"), "multiply": ("CC", "C"),
    "leftshift": ("CD", "C"), "rightshift": ("CD", "C"),
}


def _normalise(text: str) -> str | None:
    text = text.strip()
    while (trimmed := _TRAILER.sub("", text)) != text:
        text = trimmed
    text = " ".join(text.split())
    return text or None


def _powers_of_two(text: str) -> str | None:
    """The options a response calls a power of 2, as "A" or "A, C"; None when it names none."""
    starts = list(_OPTION.finditer(text))
    named = [
        match.group(1) for match, after in zip(starts, [*starts[1:], None])
        if _IS_POWER.search(text, match.end(), after.start() if after else len(text))
    ]
    return ", ".join(named) or None


def extract_answer(text: str) -> str | None:
    """The answer a response states, whitespace-normalised; None when it states none."""
    if final := _FINAL_LINE.search(text):
        return _normalise(final.group(1))
    if statement := _STATEMENT.search(text):
        return _normalise(statement.group(3))
    return _powers_of_two(text)


def _value(token: str, notation: str) -> int | None:
    if notation == "C":
        return from_circled(token) if re.fullmatch(_CIRCLED, token) else None
    return int(token) if re.fullmatch(r"[0-9]+", token) else None


def _statement_holds(op: str, operands: str, stated: str) -> bool:
    """Whether `op operands = stated` is true, written in the operation's notation."""
    notations, result_notation = _SIGNATURES[op]
    tokens = operands.split()
    if len(tokens) != len(notations):
        return False
    values = [_value(token, notation) for token, notation in zip(tokens, notations)]
    if None in values:
        return False
    a, b = values[0], values[-1]
    result = {
        "todecimal": a, "tobinary": a, "add": a + b, "subtract": a - b, "multiply": a * b,
        "leftshift": a << b, "rightshift": a >> b,
    }[op]
    if result < 0:
        return False
    return _normalise(stated) == (to_circled(result) if result_notation == "C" else str(result))


def false_claim(text: str) -> str | None:
    """The first claim in a response that does not hold (a statement or an equation); None if all hold."""
    for match in _STATEMENT.finditer(text):
        if not _statement_holds(*match.groups()):
            return match.group(0).strip()
    for match in _EQUATION.finditer(text):
        if from_circled(match.group(1)) != int(match.group(2)):
            return match.group(0)
    for match in _DECIMAL_STEP.finditer(text):
        x, sym, y, total = match.groups()
        if int(x) + (int(y) if sym == "+" else -int(y)) != int(total):
            return match.group(0).strip()
    return None


def is_correct(expected: str, text: str) -> bool:
    stated = extract_answer(text)
    return stated is not None and stated == _normalise(expected) and false_claim(text) is None


def expected_from_answer(text: str) -> str:
    """The expected value a gold answer establishes: the answer it states.

    Raises ValueError when it states no answer or makes a claim that does not hold, so bad
    gold data is refused rather than turned into a wrong expectation.
    """
    stated = extract_answer(text)
    if stated is None:
        raise ValueError(f"the answer states no result: {text[:80]!r}")
    if (claim := false_claim(text)) is not None:
        raise ValueError(f"the answer makes a false claim: {claim!r}")
    return stated


BINARY = SkillModule(SKILL, MAX_LEVEL, generate, facts_of, is_held_out, extract_answer, is_correct)
