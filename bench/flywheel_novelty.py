"""`novel_share` of `python -m bench.flywheel`: how many suite items (selection, confirmation, test) the run never trained on.

Judged against what the run really trained, not against the split rule that chose the items:
every accepted dataset under `<data>/artifacts/datasets/` (the curriculum's practice, hard
examples, anything submitted) is read, and a suite item (`<data>/evaluator/suites/*.jsonl`: the
selection suite, the confirmation suite and every sealed test version) is novel when

- no trained row poses the same problem, in any wording or operand order (the item's skill
  reads both prompts: `Skill.problem_key`), and
- its gold answer holds a line that no trained row holds anywhere ("Step n:" labels aside), so
  it cannot be copied from a commuted twin or from a step of a larger trained problem.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from libs.common.skills import SKILLS

_STEP = re.compile(r"^Step \d+:\s*")


class _Row(msgspec.Struct):
    messages: list[dict]


class _Item(msgspec.Struct):
    messages: list[dict]
    skill: str


def _lines(text: str) -> set[str]:
    return {_STEP.sub("", line.strip()) for line in text.splitlines() if line.strip()}


def _keys(prompt: str) -> set[str]:
    """What the prompt poses, as each skill reads it (none: it poses no skill's problem)."""
    keys = set()
    for name, skill in SKILLS.items():
        try:
            keys.add(f"{name}:{skill.problem_key(prompt)}")
        except ValueError:
            continue
    return keys


def novel_share(data_dir: Path) -> dict:
    """{"items", "novel", "share", "trained_rows", "seen": a few items that are not novel, with why}."""
    trained_keys: set[str] = set()
    trained_lines: set[str] = set()
    rows = 0
    decoder = msgspec.json.Decoder(_Row)
    for path in sorted((data_dir / "artifacts" / "datasets").glob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            if not raw.strip():
                continue
            row = decoder.decode(raw)
            rows += 1
            for message in row.messages:
                if message.get("role") == "user":
                    trained_keys |= _keys(message.get("content", ""))
                trained_lines |= _lines(message.get("content", ""))
    items = novel = 0
    seen: list[str] = []
    item_decoder = msgspec.json.Decoder(_Item)
    for path in sorted((data_dir / "evaluator" / "suites").glob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            if not raw.strip():
                continue
            item = item_decoder.decode(raw)
            prompt, answer = item.messages[0]["content"], item.messages[-1]["content"]
            items += 1
            key = f"{item.skill}:{SKILLS[item.skill].problem_key(prompt)}"
            if key in trained_keys:
                why = "posed by a trained row"
            elif _lines(answer) <= trained_lines:
                why = "every line of its answer is a trained line"
            else:
                novel += 1
                continue
            if len(seen) < 5:
                seen.append(f"{path.name}: {key[:80]}: {why}")
    return {"items": items, "novel": novel, "share": round(novel / items, 4) if items else None,
            "trained_rows": rows, "seen": seen}
