"""The evaluator's HTTP routes: the suite in use and the scores recorded."""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter, HTTPException

from libs.common.artifacts import is_sha256
from services.evaluator.scorebook import Scorebook
from services.evaluator.suite import Suite


class Scores(Protocol):
    """What the routes read: the suite and the scorebook."""

    suite: Suite
    scorebook: Scorebook


def router(evaluator: Scores) -> APIRouter:
    routes = APIRouter()

    @routes.get("/suite")
    async def current_suite() -> dict:
        suite = evaluator.suite
        levels: dict[str, int] = {}
        for item in suite.items:
            levels[item.level_key] = levels.get(item.level_key, 0) + 1
        return {"name": suite.name, "version": suite.version, "num_items": len(suite.items), "items_per_level": levels}

    @routes.get("/scores")
    async def recent_scores(limit: int = 50) -> list[dict]:
        return msgspec.to_builtins(evaluator.scorebook.recent(limit))

    @routes.get("/scores/{sha256}")
    async def checkpoint_scores(sha256: str) -> list[dict]:
        """Every suite's score for this checkpoint, with the per-item outputs."""
        if not is_sha256(sha256):
            raise HTTPException(422, "not a sha256 hex digest")
        records = evaluator.scorebook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"no scores for checkpoint {sha256}")
        return msgspec.to_builtins(records)

    return routes
