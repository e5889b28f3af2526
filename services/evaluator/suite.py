"""The evaluation suites: which items every checkpoint is scored on, fixed for good.

Three suites, three roles (DESIGN.md, "Learning honestly"):
- the selection suite (`SUITE_NAME`) scores every candidate; its scores decide level changes
  (the curriculum) and screen candidates for promotion (the deployer);
- the confirmation suite (`CONFIRMATION_SUITE_NAME`) scores a candidate past the screen, and the
  champion, at the levels where the screen saw the candidate ahead: a promotion is decided on
  it (libs.common.paired). Fresh problems at the selection suite's levels, `confirm_items_per_level`
  a level, none a selection or test problem: the screen never saw them;
- the sealed test suite (`TEST_SUITE_NAME`) scores champions only, and only reports: every
  number shown for a champion comes from it. It holds fresh problems at the selection suite's
  levels, as many per level, none of them a selection problem (`Skill.problem_key`: what a
  problem is, whatever its wording), so a champion's figures are not the best of many
  candidates' on the same items.

The selection suite holds items of every skill (`libs.common.skills.SKILLS`), `items_per_level`
at each of the skill's levels 1..max (a per-skill setting; 0 leaves the skill out), drawn from
the skill's eval split (problems that training data can never contain) with a fixed seed; the
test suite draws from the same split with its own seed. Each item is judged by its own skill's
`is_correct`; `expected` is whatever that skill states (Binary a string, SYLLO the list of
answer words). A suite is written once to `<evaluator dir>/suites/` and read back from there on
every later start, so a restart, or a change to a generator's code, never silently changes what
the scores mean. Its version is its name and a hash of its items: two scores are comparable
exactly when their suite versions are equal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import msgspec

from libs.common.artifacts import write_atomically
from libs.common.chat import ChatMessage
from libs.common.skills import SKILLS, Expected

SUITE_NAME = "skills"
TEST_SUITE_NAME = "skills-test"
CONFIRMATION_SUITE_NAME = "skills-confirm"
# The revision of the item format, part of every version.
_FORMAT = "v2"


class SuiteItem(msgspec.Struct, frozen=True):
    messages: list[ChatMessage]
    skill: str
    level: int
    scenario: str
    expected: Expected

    @property
    def level_key(self) -> str:
        return f"{self.skill}/{self.level}"


class Suite(msgspec.Struct, frozen=True):
    name: str
    version: str
    items: list[SuiteItem]

    def levels(self) -> dict[str, list[int]]:
        """The levels the suite covers, per skill, in suite order."""
        covered: dict[str, list[int]] = {}
        for item in self.items:
            if item.level not in covered.setdefault(item.skill, []):
                covered[item.skill].append(item.level)
        return covered


def suite_version(items: list[SuiteItem], name: str = SUITE_NAME) -> str:
    canonical = json.dumps(msgspec.to_builtins(items), sort_keys=True, ensure_ascii=False)
    return f"{name}-{_FORMAT}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def problem_keys(suite: Suite) -> dict[str, set[str]]:
    """Per skill, what each of the suite's problems is (`Skill.problem_key` of its user prompt)."""
    keys: dict[str, set[str]] = {}
    for item in suite.items:
        prompt = next(m.content for m in item.messages if m.role == "user")
        keys.setdefault(item.skill, set()).add(SKILLS[item.skill].problem_key(prompt))
    return keys


def shared_problems(a: Suite, b: Suite) -> set[str]:
    """The problems both suites pose."""
    keys_b = problem_keys(b)
    return {key for skill, keys in problem_keys(a).items() for key in keys & keys_b.get(skill, set())}


def check_max_levels(max_levels: Mapping[str, int]) -> dict[str, int]:
    """`max_levels` in SKILLS order, checked: every skill named once, each within 0..its max level."""
    if unknown := set(max_levels) - set(SKILLS):
        raise ValueError(f"unknown skill(s) {sorted(unknown)}: the skills are {', '.join(sorted(SKILLS))}")
    if missing := set(SKILLS) - set(max_levels):
        raise ValueError(f"no suite max level for skill(s) {sorted(missing)}")
    for name, top in max_levels.items():
        if not 0 <= top <= SKILLS[name].max_level:
            raise ValueError(f"suite max level of {name} must be 0..{SKILLS[name].max_level}, got {top}")
    if not any(max_levels.values()):
        raise ValueError("the suite covers no level of any skill")
    return {name: max_levels[name] for name in SKILLS}


def build_suite(max_levels: Mapping[str, int], items_per_level: int, seed: int) -> Suite:
    """The suite for these settings, generated fresh (deterministic in its arguments).

    Raises ValueError when a level holds fewer than `items_per_level` distinct eval problems.
    """
    rows = [
        row
        for name, top in check_max_levels(max_levels).items()
        for level in range(1, top + 1)
        for row in SKILLS[name].generate(level, items_per_level, seed, split="eval")
    ]
    items = msgspec.convert(rows, list[SuiteItem])
    return Suite(name=SUITE_NAME, version=suite_version(items), items=items)


def build_test_suite(selection: Suite, seed: int) -> Suite:
    """The sealed test suite beside `selection`: at its levels, as many items per level, drawn
    from the eval split with `seed`, no problem of `selection` among them (deterministic in its
    arguments). Raises ValueError when a level holds too few distinct eval problems for both."""
    per_level: dict[str, int] = {}
    for item in selection.items:
        per_level[item.level_key] = per_level.get(item.level_key, 0) + 1
    held = problem_keys(selection)
    rows = [
        row
        for name, levels in selection.levels().items()
        for level in levels
        for row in SKILLS[name].generate(level, per_level[f"{name}/{level}"], seed, split="eval",
                                         exclude=held[name])
    ]
    items = msgspec.convert(rows, list[SuiteItem])
    return Suite(name=TEST_SUITE_NAME, version=suite_version(items, TEST_SUITE_NAME), items=items)


def build_confirmation_suite(selection: Suite, test: Suite, seed: int, items_per_level: int) -> Suite:
    """The confirmation suite beside `selection` and `test`: at the selection suite's levels, up to
    `items_per_level` each (all a level has left when fewer: Binary level 1 holds 127 distinct eval
    problems, 31 after the other two suites), drawn from the eval split with `seed`, no problem of
    either among them (deterministic in its arguments)."""
    held = problem_keys(selection)
    for skill, keys in problem_keys(test).items():
        held.setdefault(skill, set()).update(keys)
    rows = [
        row
        for name, levels in selection.levels().items()
        for level in levels
        for row in _draw_up_to(name, level, items_per_level, seed, held.get(name, set()))
    ]
    items = msgspec.convert(rows, list[SuiteItem])
    return Suite(name=CONFIRMATION_SUITE_NAME, version=suite_version(items, CONFIRMATION_SUITE_NAME), items=items)


def _draw_up_to(skill: str, level: int, n: int, seed: int, exclude: set[str]) -> list[dict]:
    """`n` eval rows of `skill` at `level` without the problems in `exclude`, or all there are when
    fewer. A draw of k rows is the first k of a longer draw (one random sequence), so the largest
    k that can be drawn is found by bisection."""
    def draw(k: int) -> list[dict] | None:
        try:
            return SKILLS[skill].generate(level, k, seed, split="eval", exclude=exclude)
        except ValueError:
            return None

    if (rows := draw(n)) is not None:
        return rows
    low, high = 0, n  # draw(low) works, draw(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if draw(middle) is not None else (low, middle)
    return draw(low) or []


def load_or_create_suite(folder: Path, max_levels: Mapping[str, int], items_per_level: int, seed: int) -> Suite:
    """The selection suite saved under `folder` for these settings; built and saved on first use."""
    levels = "-".join(f"{name}{top}" for name, top in check_max_levels(max_levels).items())
    path = folder / f"{SUITE_NAME}-seed{seed}-{levels}-n{items_per_level}.jsonl"
    return _load(path, SUITE_NAME) or _save(path, build_suite(max_levels, items_per_level, seed))


def load_or_create_test_suite(folder: Path, selection: Suite, seed: int) -> Suite:
    """The sealed test suite saved under `folder` for `selection` and `seed`; built and saved on
    first use. A new `seed` (or a new selection suite) is a new file and a new version; the old
    file stays, as do the scores on it. Raises ValueError when the saved file shares a problem
    with `selection` (what a problem is changed since it was written): a test must stay sealed."""
    path = folder / f"{TEST_SUITE_NAME}-seed{seed}-for-{selection.version}.jsonl"
    test = _load(path, TEST_SUITE_NAME) or _save(path, build_test_suite(selection, seed))
    if shared := shared_problems(test, selection):
        raise ValueError(f"{path} shares {len(shared)} problem(s) with the selection suite {selection.version} "
                         f"(e.g. {sorted(shared)[0]!r}): move the file away and restart to build a new test version")
    return test


def load_or_create_confirmation_suite(folder: Path, selection: Suite, test: Suite, seed: int,
                                      items_per_level: int) -> Suite:
    """The confirmation suite saved under `folder` for `selection`, `test`, `seed` and
    `items_per_level`; built and saved on first use. Raises ValueError when the saved file shares
    a problem with either (what a problem is changed since it was written)."""
    path = folder / f"{CONFIRMATION_SUITE_NAME}-seed{seed}-n{items_per_level}-for-{selection.version}-{test.version}.jsonl"
    confirmation = _load(path, CONFIRMATION_SUITE_NAME) or _save(
        path, build_confirmation_suite(selection, test, seed, items_per_level))
    for other in (selection, test):
        if shared := shared_problems(confirmation, other):
            raise ValueError(f"{path} shares {len(shared)} problem(s) with {other.version} (e.g. {sorted(shared)[0]!r}): "
                             "move the file away and restart to build a new confirmation suite")
    return confirmation


def _load(path: Path, name: str) -> Suite | None:
    if not path.exists():
        return None
    decoder = msgspec.json.Decoder(SuiteItem)
    items = [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
    return Suite(name=name, version=suite_version(items, name), items=items)


def _save(path: Path, suite: Suite) -> Suite:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (msgspec.json.encode(item) + b"\n" for item in suite.items))
    return suite
