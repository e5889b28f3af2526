"""The held-out evaluation suite: which items every checkpoint is scored on, fixed for good.

The suite holds items of every skill (`libs.common.skills.SKILLS`), `items_per_level` at each
of the skill's levels 1..max (a per-skill setting; 0 leaves the skill out), drawn from the
skill's eval split (problems that training data can never contain) with a fixed seed. Each
item is judged by its own skill's `is_correct`; `expected` is whatever that skill states (Binary
a string, SYLLO the list of answer words). The suite is written once to `<evaluator dir>/suites/`
and read back from there on every later start, so a restart, or a change to a generator's
code, never silently changes what the scores mean. Its version is a hash of its items: two
scores are comparable exactly when their suite versions are equal.
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


def suite_version(items: list[SuiteItem]) -> str:
    canonical = json.dumps(msgspec.to_builtins(items), sort_keys=True, ensure_ascii=False)
    return f"{SUITE_NAME}-v2-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


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


def load_or_create_suite(folder: Path, max_levels: Mapping[str, int], items_per_level: int, seed: int) -> Suite:
    """The suite saved under `folder` for these settings; built and saved on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    levels = "-".join(f"{name}{top}" for name, top in check_max_levels(max_levels).items())
    path = folder / f"{SUITE_NAME}-seed{seed}-{levels}-n{items_per_level}.jsonl"
    if path.exists():
        decoder = msgspec.json.Decoder(SuiteItem)
        items = [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
        return Suite(name=SUITE_NAME, version=suite_version(items), items=items)
    suite = build_suite(max_levels, items_per_level, seed)
    write_atomically(path, (msgspec.json.encode(item) + b"\n" for item in suite.items))
    return suite
