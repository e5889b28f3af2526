"""What a skill is, and the two rules every skill shares: which problems are held out, and how rows are drawn.

A skill (Binary, SYLLO) is a kind of problem with levels of difficulty 1..max_level. It
generates chat rows at a level, tells which split a problem belongs to, reads the answer a
response states and judges it against the expected one. The curriculum (which writes practice
data) and the evaluator (which scores checkpoints on held-out suites) use skills only through
this interface.

Held out means never seen in any form. A skill names the *facts* a problem involves (`Facts`):
the facts its answer must work out (`tested`: a sum's pair of operands, whatever their order; a
conversion's number; a SYLLO puzzle's words) and every fact its gold answer states on the way
(`stated`: a worked sum also converts both operands and its result). A fact is held out when
its hash falls in the skill's share of HOLD_OUT_BUCKETS (`held_out`). Then, for every problem
(`split_from_facts`):

- eval: it tests a held-out fact — it is a held-out item;
- train: it states no held-out fact at all — it is training material;
- neither: it tests only trained facts but states a held-out one on the way (a sum of a
  held-out number): never trained, never scored.

So no training row of any level states a held-out fact, and every held-out item's answer works
out at least one line that no training row holds: a commuted twin or a conversion that a trained
sum shows as a step cannot leak it. A problem's split depends on nothing but the problem, so it
holds whatever seeds either side uses; the gatekeeper applies the same rule to submitted rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
# What a row's "expected" holds: Binary a string, SYLLO the list of answer words.
Expected = str | list[str]

# A fact is held out when its hash falls in the first `share` of these buckets (a skill sets the share).
HOLD_OUT_BUCKETS = 16
# Draws allowed per requested row before a level is declared too small for the request.
_DRAWS_PER_ROW = 200


@runtime_checkable
class Skill(Protocol):
    name: str
    max_level: int

    def generate(self, level: int, n: int, seed: int, split: Split = "train",
                 exclude: Collection[str] = ()) -> list[dict]:
        """`n` chat rows at `level`, deterministic in (level, n, seed, split, exclude).

        A row: {"messages": [user, assistant], "skill", "level", "scenario", "expected"} (a
        skill may add fields of its own). Eval rows are distinct problems; train rows may repeat.
        No row poses a problem whose `problem_key` is in `exclude`.
        """
        ...

    def problem_key(self, prompt: str) -> str:
        """What the problem posed by `prompt` is, whatever its wording or operand order."""
        ...

    def split_of(self, prompt: str) -> Split | None:
        """The split the problem posed by `prompt` belongs to (None: neither); ValueError when
        `prompt` poses no problem of this skill."""
        ...

    def held_out_facts(self, prompt: str) -> list[str]:
        """The held-out facts the problem posed by `prompt` states (none for a training problem)."""
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
    facts_of: Callable[[str], Facts]
    is_held_out: Callable[[str], bool]
    extract_answer: Callable[[str], Expected | None]
    is_correct: Callable[[Expected, str], bool]

    def problem_key(self, prompt: str) -> str:
        return self.facts_of(prompt).key

    def split_of(self, prompt: str) -> Split | None:
        return split_from_facts(self.facts_of(prompt), self.is_held_out)

    def held_out_facts(self, prompt: str) -> list[str]:
        """The held-out facts the problem `prompt` poses states (none for a training problem)."""
        return sorted(fact for fact in self.facts_of(prompt).stated if self.is_held_out(fact))


@dataclass(frozen=True)
class Facts:
    """What a problem is, in facts: strings a skill writes, each naming one piece of knowledge."""

    key: str  # the problem itself, whatever its wording or operand order
    tested: frozenset[str]  # what its answer must work out
    stated: frozenset[str]  # everything its gold answer states (the tested facts included)


def held_out(fact: str, share: int) -> bool:
    """Whether `fact` is held out: its hash falls in the first `share` of HOLD_OUT_BUCKETS buckets."""
    return int.from_bytes(hashlib.sha256(fact.encode()).digest()[:4], "big") % HOLD_OUT_BUCKETS < share


def split_from_facts(facts: Facts, is_held_out: Callable[[str], bool]) -> Split | None:
    """The one rule every skill shares: eval when a tested fact is held out, train when no stated
    fact is, else neither (None)."""
    if any(is_held_out(fact) for fact in facts.tested):
        return "eval"
    if any(is_held_out(fact) for fact in facts.stated):
        return None
    return "train"


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
              make: Callable[[random.Random], Problem], facts_of: Callable[[str], Facts],
              split_of: Callable[[Facts], Split | None], exclude: Collection[str] = ()) -> list[dict]:
    """`n` rows of `split` drawn from `make`, deterministic in (skill, level, n, seed, split).

    Problems of the other split, and those whose key is in `exclude`, are skipped; in the eval
    split a problem key is used once.
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
        facts = facts_of(problem.prompt)
        key = facts.key
        if split_of(facts) != split or key in exclude or (split == "eval" and key in seen):
            continue
        seen.add(key)
        rows.append(problem.row(skill, level))
    if len(rows) < n:
        raise ValueError(f"{skill} level {level} has too few distinct {split} problems for {n} rows")
    return rows
