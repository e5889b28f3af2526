"""The held_out check: a submitted row never poses a problem that the evaluator holds out.

A skill's held-out problems (libs.common.skills: its selection suite and sealed test draw from
them) must never be trained, or the scores stop meaning "right on what it has not seen". Each
user turn of a chat row is read by every skill (`Skill.split_of`: the problem it poses, in any
wording or operand order); a row that poses a held-out problem, or states a held-out fact on the
way (a sum of a held-out number), is dropped with the problem in the reason, and the rest of the
file is kept. Text that poses no skill's problem passes unread beyond a quick look for the
skill's marks (circled digits or "binary"; SYLLO's blanks).

It runs at the standard level, the level every channel submits at unless told otherwise, where
reading a problem costs little beside tokenizing its row: at the quick level it would cost more
than the rest of that level together (docs/decisions/held-out.md).
"""

from __future__ import annotations

from libs.common.skills import SKILLS
from libs.common.skills.binary import ONE, ZERO
from services.gatekeeper.checks import Batch, Check, LevelCheck

HELD_OUT = Check(
    "held_out", "standard", "error", "row",
    "no user turn poses a problem a skill holds out for evaluation (its selection suite and sealed test), "
    "in any wording or operand order",
)

# What a text must contain to be worth reading as each skill's problem.
_MARKS = {"binary": (ONE, ZERO, "binary"), "syllo": ("___",)}


def held_out_reason(text: str) -> str | None:
    """Why a user turn must not be trained (the held-out problem it poses), or None."""
    for name, skill in SKILLS.items():
        if not any(mark in text for mark in _MARKS[name]):
            continue
        try:
            split = skill.split_of(text)
        except ValueError:
            continue  # not this skill's problem
        if split == "train":
            return None
        facts = ", ".join(skill.held_out_facts(text))
        if split == "eval":
            return f"poses a held-out {name} problem: {facts[:200]}"
        return f"states a held-out {name} fact on the way to its answer: {facts[:200]}"
    return None


class HeldOut(LevelCheck):
    """The held_out check over a batch of chat rows: every user turn is read."""

    def __init__(self, schema) -> None:
        self.schema = schema

    def __call__(self, batch: Batch) -> None:
        for i in batch.live():
            for message in self.schema.conversation(batch.rows[i]):
                if message.role == "user" and (reason := held_out_reason(message.content)):
                    batch.error(i, HELD_OUT, reason)
                    break
