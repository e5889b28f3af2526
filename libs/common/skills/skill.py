"""What a skill is, and the two rules every skill shares: the train/eval split and how rows are drawn.

A skill (Binary, SYLLO) is a kind of problem with levels of difficulty 1..max_level. It
generates chat rows at a level, tells which split a problem belongs to, reads the answer a
response states and judges it against the expected one. The curriculum (which writes practice
data) and the evaluator (which scores checkpoints on a held-out suite) use skills only through
this interface.

The split is decided here, once for every skill: a problem's key (what the problem *is*, not
how it happens to be worded: a skill defines it) is hashed, and one key in EVAL_BUCKETS belongs
to the eval split, the rest to train. A problem's split therefore depends on nothing but the
problem, so an eval item can never appear in training data, whatever seeds either side uses.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
# What a row's "expected" holds: Binary a string, SYLLO the list of answer words.
Expected = str | list[str]

# One problem key in EVAL_BUCKETS goes to the eval split; the rest are training material.
EVAL_BUCKETS = 8
# Draws allowed per requested row before a level is declared too small for the request.
_DRAWS_PER_ROW = 200


@runtime_checkable
class Skill(Protocol):
    name: str
    max_level: int

    def generate(self, level: int, n: int, seed: int, split: Split = "train") -> list[dict]:
        """`n` chat rows at `level`, deterministic in (level, n, seed, split).

        A row: {"messages": [user, assistant], "skill", "level", "scenario", "expected"} (a
        skill may add fields of its own). Eval rows are distinct problems; train rows may repeat.
        """
        ...

    def split_of(self, prompt: str) -> Split:
        """The split the problem posed by `prompt` belongs to."""
        ...

    def extract_answer(self, text: str) -> Expected | None:
        """The answer a response states, normalised; None when it states none."""
        ...

    def is_correct(self, expected: Expected, text: str) -> bool:
        """Whether the response `text` states the expected answer (and nothing that contradicts it)."""
        ...


@dataclass(frozen=True)
class SkillModule:
    """A skill whose module holds its functions: the one adapter to the `Skill` interface."""

    name: str
    max_level: int
    generate: Callable[..., list[dict]]
    split_of: Callable[[str], Split]
    extract_answer: Callable[[str], Expected | None]
    is_correct: Callable[[Expected, str], bool]


def split_by_key(key: str) -> Split:
    """The split of the problem whose key is `key`: the one rule shared by every skill."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


@dataclass(frozen=True)
class Problem:
    """One generated problem with its gold answer, before it becomes a chat row."""

    scenario: str
    prompt: str
    answer: str
    expected: Expected
    # Fields a skill adds to its rows (SYLLO: the puzzle, as the gatekeeper's syllo_v1 schema has it).
    extra: Mapping[str, object] = field(default_factory=dict)

    def row(self, skill: str, level: int) -> dict:
        return {
            "messages": [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}],
            "skill": skill,
            "level": level,
            "scenario": self.scenario,
            "expected": self.expected,
            **self.extra,
        }


def draw_rows(skill: str, level: int, n: int, seed: int, split: Split,
              make: Callable[[random.Random], Problem], key_of: Callable[[str], str]) -> list[dict]:
    """`n` rows of `split` drawn from `make`, deterministic in (skill, level, n, seed, split).

    Problems of the other split are skipped; in the eval split a problem key is used once.
    Raises ValueError when the level holds too few distinct eval problems for `n`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"row count must be >= 0, got {n}")
    rng = random.Random(f"{skill}:{split}:{level}:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(_DRAWS_PER_ROW * n + 1000):
        if len(rows) == n:
            break
        problem = make(rng)
        key = key_of(problem.prompt)
        if split_by_key(key) != split or (split == "eval" and key in seen):
            continue
        seen.add(key)
        rows.append(problem.row(skill, level))
    if len(rows) < n:
        raise ValueError(f"{skill} level {level} has too few distinct {split} problems for {n} rows")
    return rows
