"""Schema `syllo_v1`: a SYLLO word puzzle as a chat row, plus the puzzle it poses.

A SYLLO puzzle gives syllables to assemble into words. A row is a chat_sft_v1 conversation
(same checks, same normalised form; the `profile` field is not part of it, every row has the
`syllo` profile) plus a required `puzzle`:

    {"messages": [...],
     "puzzle": {"syllables": ["ba", "na", "na", "ap", "ple"], "answers": ["banana", "apple"],
                "difficulty": 2}}

Quick row checks: those of chat_sft_v1 and
- puzzle   a `puzzle` object with `syllables` (1..64) and `answers` (1..32), lists of
           non-empty strings, and an optional integer `difficulty` >= 1
Deep: answer_format with the syllo profile (profiles.py).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from services.gatekeeper.chat_sft import EXTRA_FIELDS, PROFILE, ChatSftV1, Findings, Message, kind_of
from services.gatekeeper.checks import Check

MAX_SYLLABLES = 64
MAX_ANSWERS = 32
PUZZLE = Check(
    "puzzle", "quick", "error", "row",
    f"a `puzzle` with syllables (1..{MAX_SYLLABLES}) and answers (1..{MAX_ANSWERS}), lists of non-empty strings, "
    "and an optional integer difficulty >= 1",
)

Word = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Puzzle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    syllables: Annotated[list[Word], msgspec.Meta(min_length=1, max_length=MAX_SYLLABLES)]
    answers: Annotated[list[Word], msgspec.Meta(min_length=1, max_length=MAX_ANSWERS)]
    difficulty: Annotated[int, msgspec.Meta(ge=1)] | None = None


class SylloRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One syllo_v1 row: a chat conversation and the puzzle it solves."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    puzzle: Puzzle


class SylloV1(ChatSftV1):
    name = "syllo_v1"
    description = "SYLLO word puzzles: chat rows plus the puzzle (syllables, answers, difficulty)"
    row_type = SylloRow
    profiles = ("syllo",)
    fields = ("messages", "puzzle")
    checks: tuple[Check, ...] = (*(c for c in ChatSftV1.checks if c is not PROFILE), PUZZLE)

    def from_object(self, value: dict, found: Findings):
        extra = sorted(key for key in value if key not in self.fields)
        if extra:
            found.append((EXTRA_FIELDS, f"fields {extra} are not part of {self.name} and are dropped"))
        messages = self._messages(value, found)
        puzzle = _puzzle(value, found)
        if messages is None or puzzle is None:
            return None
        return SylloRow(messages=messages, puzzle=puzzle)

    def profile(self, row) -> str:
        return "syllo"


def _puzzle(value: dict, found: Findings) -> Puzzle | None:
    puzzle = value.get("puzzle")
    if not isinstance(puzzle, dict):
        found.append((PUZZLE, "no `puzzle` object" if puzzle is None else f"`puzzle` is {kind_of(puzzle)}"))
        return None
    try:
        return msgspec.convert(puzzle, Puzzle)
    except msgspec.ValidationError as exc:
        found.append((PUZZLE, f"puzzle: {exc}"))
        return None
