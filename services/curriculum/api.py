"""The curriculum's HTTP routes: current levels and the history of level changes."""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter

from libs.common.records import SkillState
from libs.common.skills import get_skill
from services.curriculum.settings import CurriculumSettings


class Levels(Protocol):
    """What the routes read: the settings and every practised skill's state."""

    settings: CurriculumSettings

    async def skill_states(self) -> dict[str, SkillState]: ...


def router(curriculum: Levels) -> APIRouter:
    routes = APIRouter()
    settings = curriculum.settings

    @routes.get("/levels")
    async def levels() -> dict:
        return {skill: {
            "level": state.level,
            "max_level": get_skill(skill).max_level,
            "recent_accuracy": state.recent,
            "threshold": settings.threshold,
            "window": settings.window,
            "datasets_submitted": state.datasets_submitted,
        } for skill, state in (await curriculum.skill_states()).items()}

    @routes.get("/history")
    async def history() -> list[dict]:
        """Level changes of every skill, newest first."""
        changes = [{"skill": skill, **msgspec.to_builtins(c)}
                   for skill, state in (await curriculum.skill_states()).items() for c in state.changes]
        return sorted(changes, key=lambda c: c["time"], reverse=True)

    return routes
