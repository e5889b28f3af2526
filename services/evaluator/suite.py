"""The held-out evaluation suite: which items every checkpoint is scored on, fixed for good.

Items come from the Binary skill's eval split (problems that training data can never
contain) with a fixed seed. The suite is written once to `<evaluator dir>/suites/` and read
back from there on every later start, so a restart, or a change to the generator's code,
never silently changes what the scores mean. Its version is a hash of its items: two scores
are comparable exactly when their suite versions are equal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec

from libs.common.artifacts import write_atomically
from libs.common.chat import ChatMessage
from libs.common.skills import binary

SUITE_NAME = "binary"


class SuiteItem(msgspec.Struct, frozen=True):
    messages: list[ChatMessage]
    skill: str
    level: int
    scenario: str
    expected: str

    @property
    def level_key(self) -> str:
        return f"{self.skill}/{self.level}"


class Suite(msgspec.Struct, frozen=True):
    name: str
    version: str
    items: list[SuiteItem]


def suite_version(items: list[SuiteItem]) -> str:
    canonical = json.dumps(msgspec.to_builtins(items), sort_keys=True, ensure_ascii=False)
    return f"{SUITE_NAME}-v1-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def build_suite(max_level: int, items_per_level: int, seed: int) -> Suite:
    """The suite for these settings, generated fresh (deterministic in its arguments)."""
    if not 1 <= max_level <= binary.MAX_LEVEL:
        raise ValueError(f"suite max level must be 1..{binary.MAX_LEVEL}, got {max_level}")
    rows = [
        row for level in range(1, max_level + 1) for row in binary.generate(level, items_per_level, seed, split="eval")
    ]
    items = msgspec.convert(rows, list[SuiteItem])
    return Suite(name=SUITE_NAME, version=suite_version(items), items=items)


def load_or_create_suite(folder: Path, max_level: int, items_per_level: int, seed: int) -> Suite:
    """The suite saved under `folder` for these settings; built and saved on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SUITE_NAME}-seed{seed}-L1-{max_level}-n{items_per_level}.jsonl"
    if path.exists():
        decoder = msgspec.json.Decoder(SuiteItem)
        items = [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
        return Suite(name=SUITE_NAME, version=suite_version(items), items=items)
    suite = build_suite(max_level, items_per_level, seed)
    write_atomically(path, (msgspec.json.encode(item) + b"\n" for item in suite.items))
    return suite
