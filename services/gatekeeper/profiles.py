"""Answer profiles (deep): what a well-formed answer looks like for a kind of task.

A row's profile is explicit, never guessed from its content: a chat_sft_v1 row names it in
its `profile` field (`"profile": "binary"`), and every syllo_v1 row has the `syllo` profile.

- binary  the final assistant turn states its result in prefix form (`add ①⓪ ① = ①①`,
          `todecimal ①⓪① = 5`, or a `Final result:` line), found by the binary skill's own
          `extract_answer` (so what the evaluator will look for is what is trained), and the
          result is a circled-binary (⓪①) or decimal number.
- syllo   every answer word of the puzzle appears in the final assistant turn (as a whole
          word, case-insensitively), and the answer words can be built from the puzzle's
          syllables, each syllable used at most as often as it is given.

Check (deep, error): answer_format.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from libs.common.skills.binary import ONE, ZERO, extract_answer
from services.gatekeeper.checks import Batch, Check, Tally

CHAT_PROFILES: tuple[str, ...] = ("binary",)
PROFILES: tuple[str, ...] = (*CHAT_PROFILES, "syllo")

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


class AnswerFormat:
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

    def finish(self, tally: Tally) -> None:
        pass
