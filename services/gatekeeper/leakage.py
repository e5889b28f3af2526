"""Answer leakage (deep): the answer, or a large part of it, already written in the prompt.

A model trained on such rows learns to copy rather than to answer. The answer is the final
assistant turn, the prompt everything before it; both are compared case-folded with
whitespace collapsed.

- answer_leakage (error)  the answer appears verbatim in the prompt, or at least
  `min_fraction` of its characters are covered by `WINDOW`-character pieces of it that
  appear in the prompt.
Answers shorter than `min_chars` are not checked: a number or a word in the prompt ("Is it
A or B?" → "A") is how many good questions are asked.
"""

from __future__ import annotations

from services.gatekeeper.checks import Batch, Check, Tally
from services.gatekeeper.fingerprints import normalise

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


class AnswerLeakage:
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

    def finish(self, tally: Tally) -> None:
        pass
