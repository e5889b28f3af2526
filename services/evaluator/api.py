"""The evaluator's HTTP routes: the suite in use and the scores recorded."""

from __future__ import annotations

import msgspec
from fastapi import FastAPI, HTTPException

from services.evaluator.scorebook import Scorebook, is_sha256
from services.evaluator.suite import Suite


def add_routes(app: FastAPI, scorebook: Scorebook, suite: Suite) -> None:
    @app.get("/suite")
    async def current_suite() -> dict:
        levels: dict[str, int] = {}
        for item in suite.items:
            levels[item.level_key] = levels.get(item.level_key, 0) + 1
        return {"name": suite.name, "version": suite.version, "num_items": len(suite.items), "items_per_level": levels}

    @app.get("/scores")
    async def recent_scores(limit: int = 50) -> list[dict]:
        return msgspec.to_builtins(scorebook.recent(limit))

    @app.get("/scores/{sha256}")
    async def checkpoint_scores(sha256: str) -> list[dict]:
        """Every suite's score for this checkpoint, with the per-item outputs."""
        if not is_sha256(sha256):
            raise HTTPException(422, "not a sha256 hex digest")
        records = scorebook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"no scores for checkpoint {sha256}")
        return msgspec.to_builtins(records)
