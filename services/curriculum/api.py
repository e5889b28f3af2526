"""The curriculum's HTTP routes: current levels and the history of level changes."""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter

from libs.common.records import SkillState
from services.curriculum.settings import CurriculumSettings


class Levels(Protocol):
    """What the routes read: the settings, the skill and its state."""

    settings: CurriculumSettings
    skill: str

    async def skill_state(self) -> SkillState: ...


def router(curriculum: Levels) -> APIRouter:
    routes = APIRouter()
    settings, skill = curriculum.settings, curriculum.skill

    @routes.get("/levels")
    async def levels() -> dict:
        state = await curriculum.skill_state()
        return {skill: {
            "level": state.level,
            "max_level": settings.max_level,
            "recent_accuracy": state.recent,
            "threshold": settings.threshold,
            "window": settings.window,
            "datasets_submitted": state.datasets_submitted,
        }}

    @routes.get("/history")
    async def history() -> list[dict]:
        """Level changes, newest first."""
        state = await curriculum.skill_state()
        return [{"skill": skill, **msgspec.to_builtins(c)} for c in reversed(state.changes)]

    return routes
