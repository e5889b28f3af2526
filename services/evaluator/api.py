"""The evaluator's HTTP routes: the suite in use and the scores recorded."""

from __future__ import annotations

from typing import Annotated, Protocol

import msgspec
from fastapi import APIRouter, HTTPException, Path

from services.evaluator.scorebook import Scorebook
from services.evaluator.suite import Suite


class Scores(Protocol):
    """What the routes read: the suite and the scorebook."""

    suite: Suite
    scorebook: Scorebook


# A checkpoint's content hash (libs.common.artifacts.is_sha256), declared so that the document says
# so and a malformed one gets FastAPI's 422 like any other invalid parameter.
Sha256 = Annotated[str, Path(pattern="^[0-9a-f]{64}$", description="a checkpoint's sha256, lowercase hex")]


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
    async def checkpoint_scores(sha256: Sha256) -> list[dict]:
        """Every suite's score for this checkpoint, with the per-item outputs."""
        records = evaluator.scorebook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"no scores for checkpoint {sha256}")
        return msgspec.to_builtins(records)

    return routes
