"""The curriculum's HTTP routes: current levels and the history of level changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI

from services.curriculum.state import SkillBoard

if TYPE_CHECKING:
    from services.curriculum.service import CurriculumSettings


def add_routes(app: FastAPI, board: SkillBoard, settings: CurriculumSettings, skill: str) -> None:
    @app.get("/levels")
    async def levels() -> dict:
        state, _ = await board.read(skill)
        return {skill: {
            "level": state.level,
            "max_level": settings.max_level,
            "recent_accuracy": state.recent,
            "threshold": settings.threshold,
            "window": settings.window,
            "datasets_submitted": state.datasets_submitted,
        }}

    @app.get("/history")
    async def history() -> list[dict]:
        """Level changes, newest first."""
        state, _ = await board.read(skill)
        return [{"skill": skill, **msgspec.to_builtins(c)} for c in reversed(state.changes)]
