"""The deep level's answer checks: the answer's format for its profile, and the answer leaked into the prompt.

The answer is the final assistant turn, the prompt everything before it. (The deep level's
duplicate checks are in duplicates.py.)

answer_format (error): a row with a profile (schemas.py: explicit, never guessed) has an
answer of the form the profile asks for.
- binary  the final assistant turn states its result in prefix form (`add ①⓪ ① = ①①`,
          `todecimal ①⓪① = 5`, or a `Final result:` line), found by the binary skill's own
          `extract_answer` (so what the evaluator will look for is what is trained), and the
          result is a circled-binary (⓪①) or decimal number.
- syllo   every answer word of the puzzle appears in the final assistant turn (as a whole
          word, case-insensitively), and the answer words can be built from the puzzle's
          syllables, each syllable used at most as often as it is given.

answer_leakage (error, chat schemas): the answer appears verbatim in the prompt, or at least
`min_fraction` of its characters are covered by `WINDOW`-character pieces of it that appear in
the prompt; both are compared case-folded with whitespace collapsed. A model trained on such
rows learns to copy rather than to answer. Answers shorter than `min_chars` are not checked: a
number or a word in the prompt ("Is it A or B?" → "A") is how many good questions are asked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from libs.common.skills.binary import ONE, ZERO, extract_answer
from services.gatekeeper.checks import Batch, Check, LevelCheck
from services.gatekeeper.duplicates import normalise

# ---------------------------------------------------------------------------- answer format

ANSWER_FORMAT = Check(
    "answer_format", "deep", "error", "row",
    "per profile: binary answers in prefix form with a binary or decimal result; syllo answers name every "
    "answer word, each built from the given syllables",
)

_NUMBER = re.compile(rf"[{ZERO}{ONE}]+|\d+")
# Composing a word from syllables is a small search; this bounds it for hostile puzzles.
_SEARCH_STEPS = 20_000


def binary_answer_problem(answer: str) -> str | None:
    """Why `answer` is not a well-formed binary-profile answer, or None when it is."""
    stated = extract_answer(answer)
    if stated is None:
        return "no prefix-form result: expected a line like `add ①⓪ ① = ①①` or `Final result: ①①`"
    if not _NUMBER.fullmatch(stated):
        return f"the stated result {stated[:40]!r} is not a circled-binary (⓪①) or decimal number"
    return None


def syllo_answer_problem(answer: str, syllables: Sequence[str], answers: Sequence[str]) -> str | None:
    """Why `answer` does not solve the puzzle as stated, or None when it does."""
    said = answer.casefold()
    missing = [word for word in answers if not re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", said)]
    if missing:
        return f"the answer does not name {_list(missing)}"
    if not _composable([w.casefold() for w in answers], Counter(s.casefold() for s in syllables)):
        return f"the answer words {_list(answers)} cannot all be built from the syllables {_list(syllables)}"
    return None


def _composable(words: list[str], available: Counter[str]) -> bool:
    """Whether every word splits into available syllables, sharing them without reuse."""
    steps = 0

    def place(index: int) -> bool:
        return index == len(words) or split(index, 0)

    def split(index: int, start: int) -> bool:
        nonlocal steps
        word = words[index]
        if start == len(word):
            return place(index + 1)
        for syllable, left in available.items():
            steps += 1
            if steps > _SEARCH_STEPS:
                return False
            if left and syllable and word.startswith(syllable, start):
                available[syllable] -= 1
                if split(index, start + len(syllable)):
                    return True
                available[syllable] += 1
        return False

    return place(0)


def _list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(item[:30]) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class AnswerFormat(LevelCheck):
    """The answer_format check over a batch: rows with a profile, checked by it."""

    def __init__(self, schema) -> None:
        self.schema = schema

    def __call__(self, batch: Batch) -> None:
        profile_of = self.schema.profile
        for i in batch.live():
            row = batch.rows[i]
            profile = profile_of(row)
            if profile is None:
                continue
            answer = row.messages[-1].content
            if profile == "binary":
                problem = binary_answer_problem(answer)
            else:
                problem = syllo_answer_problem(answer, row.puzzle.syllables, row.puzzle.answers)
            if problem:
                batch.error(i, ANSWER_FORMAT, f"{profile}: {problem}")


# ---------------------------------------------------------------------------- answer leakage

WINDOW = 12
# Enough pieces to judge any answer; bounds the work on a very long one.
_MAX_PIECES = 256

ANSWER_LEAKAGE = Check(
    "answer_leakage", "deep", "error", "row",
    "the final answer (at least min_chars long) does not appear, wholly or mostly, in the prompt",
)


def leaked_fraction(prompt: str, answer: str, min_chars: int) -> float:
    """The share of the answer found in the prompt (0.0 when the answer is too short to judge)."""
    answer, prompt = normalise(answer), normalise(prompt)
    if len(answer) < max(min_chars, 1) or not prompt:
        return 0.0
    if answer in prompt:
        return 1.0
    if len(answer) <= WINDOW:
        return 0.0
    # Pieces every half window, so every character of the answer lies in two of them.
    step = max(WINDOW // 2, (len(answer) - WINDOW) // _MAX_PIECES + 1)
    starts = range(0, len(answer) - WINDOW + 1, step)
    covered = bytearray(len(answer))
    for start in starts:
        if answer[start:start + WINDOW] in prompt:
            covered[start:start + WINDOW] = b"\1" * WINDOW
    return sum(covered) / len(answer)


def leakage_reason(prompt: str, answer: str, min_chars: int, min_fraction: float) -> str | None:
    fraction = leaked_fraction(prompt, answer, min_chars)
    if fraction >= 1.0:
        return "the answer appears verbatim in the prompt"
    if fraction >= min_fraction:
        return f"{fraction:.0%} of the answer appears in the prompt (limit {min_fraction:.0%})"
    return None


class AnswerLeakage(LevelCheck):
    """The answer_leakage check over a batch (schemas with a prompt and an answer)."""

    def __init__(self, schema, *, min_chars: int, min_fraction: float) -> None:
        self.schema = schema
        self.min_chars = min_chars
        self.min_fraction = min_fraction

    def __call__(self, batch: Batch) -> None:
        for i in batch.live():
            pair = self.schema.prompt_and_answer(batch.rows[i])
            if pair is not None and (reason := leakage_reason(*pair, self.min_chars, self.min_fraction)):
                batch.error(i, ANSWER_LEAKAGE, reason)
