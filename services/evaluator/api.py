"""The evaluator's HTTP routes: the suites in use and the scores recorded."""

from __future__ import annotations

from typing import Annotated, Protocol

import msgspec
from fastapi import APIRouter, HTTPException, Path

from services.evaluator.scorebook import ChampionTestRecord, ConfirmationRecord, Scorebook, ScoreRecord
from services.evaluator.suite import Suite


class Scores(Protocol):
    """What the routes read: the suites and the scorebooks."""

    suite: Suite
    test_suite: Suite
    confirmation_suite: Suite
    scorebook: Scorebook[ScoreRecord]
    testbook: Scorebook[ChampionTestRecord]
    confirmbook: Scorebook[ConfirmationRecord]


# A checkpoint's content hash (libs.common.artifacts.is_sha256), declared so that the document says
# so and a malformed one gets FastAPI's 422 like any other invalid parameter.
Sha256 = Annotated[str, Path(pattern="^[0-9a-f]{64}$", description="a checkpoint's sha256, lowercase hex")]


def _summary(suite: Suite) -> dict:
    levels: dict[str, int] = {}
    for item in suite.items:
        levels[item.level_key] = levels.get(item.level_key, 0) + 1
    return {"name": suite.name, "version": suite.version, "num_items": len(suite.items), "items_per_level": levels}


def router(evaluator: Scores) -> APIRouter:
    routes = APIRouter()

    @routes.get("/suite")
    async def current_suite() -> dict:
        """The selection suite: every candidate is scored on it, and its scores decide."""
        return _summary(evaluator.suite)

    @routes.get("/test-suite")
    async def current_test_suite() -> dict:
        """The sealed test suite: champions are scored on it, and its scores only report."""
        return _summary(evaluator.test_suite)

    @routes.get("/confirmation-suite")
    async def current_confirmation_suite() -> dict:
        """The confirmation suite: a candidate past the screen, and the champion, are scored on it
        where the screen saw the candidate ahead; its scores decide a promotion."""
        return _summary(evaluator.confirmation_suite)

    @routes.get("/scores")
    async def recent_scores(limit: int = 50) -> list[dict]:
        return msgspec.to_builtins(evaluator.scorebook.recent(limit))

    @routes.get("/scores/{sha256}")
    async def checkpoint_scores(sha256: Sha256) -> list[dict]:
        """Every selection suite's score for this checkpoint, with the per-item outputs."""
        records = evaluator.scorebook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"no scores for checkpoint {sha256}")
        return msgspec.to_builtins(records)

    @routes.get("/tests/{sha256}")
    async def champion_tests(sha256: Sha256) -> list[dict]:
        """Every sealed test version's score for this champion, with the per-item outputs."""
        records = evaluator.testbook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"no sealed test score for checkpoint {sha256} (only champions are tested)")
        return msgspec.to_builtins(records)

    @routes.get("/confirmations/{sha256}")
    async def checkpoint_confirmations(sha256: Sha256) -> list[dict]:
        """This checkpoint's results on each confirmation suite version, level by level, with the outputs."""
        records = evaluator.confirmbook.for_checkpoint(sha256)
        if not records:
            raise HTTPException(404, f"checkpoint {sha256} was never scored on a confirmation suite")
        return msgspec.to_builtins(records)

    return routes
