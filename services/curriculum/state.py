"""Skill states in KV (bucket `curriculum`, one key per skill), changed only by compare-and-set.

`change(skill, fn)` reads the state, lets `fn` compute the next one, and writes it only if
nobody wrote in between; on a conflict it reads again and asks `fn` again. Several curriculum
replicas therefore never lose each other's updates or count an evaluation twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js.kv import KeyValue

from libs.common.kv import RevisionConflict, read_entry, write_entry

from services.curriculum.progression import SkillState

T = TypeVar("T")
MAX_ATTEMPTS = 20


class SkillBoard:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self, skill: str) -> tuple[SkillState, int]:
        """The skill's state and revision; a fresh level-1 state (revision 0) if never written."""
        value, revision = await read_entry(self.kv, skill)
        return (msgspec.json.decode(value, type=SkillState) if value else SkillState(skill=skill)), revision

    async def change(self, skill: str, fn: Callable[[SkillState], tuple[SkillState, T]]) -> T:
        """Apply `fn` (state -> (next state, result)) atomically; returns the result.

        When `fn` returns the state unchanged nothing is written.
        """
        for _ in range(MAX_ATTEMPTS):
            state, revision = await self.read(skill)
            new_state, result = fn(state)
            if new_state == state:
                return result
            try:
                await write_entry(self.kv, skill, msgspec.json.encode(new_state), revision)
            except RevisionConflict:
                continue
            return result
        raise RuntimeError(f"curriculum state {skill!r} kept changing: {MAX_ATTEMPTS} conflicts in a row")
