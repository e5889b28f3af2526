"""The deployer's HTTP routes: the champion, its history, the decisions with their reasons, rollback."""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter, HTTPException

from libs.common.kv import Record
from libs.common.records import Champion, DeployDecisions
from services.deployer.promotion import NothingToRollBack


class ChampionDesk(Protocol):
    """What the routes need: the champion and decision records, and the rollback command."""

    champion: Record[Champion]
    decisions: Record[DeployDecisions]

    async def rollback(self, requested_by: str) -> Champion: ...


def router(deployer: ChampionDesk) -> APIRouter:
    routes = APIRouter()

    @routes.get("/champion")
    async def champion() -> dict:
        current, revision = await deployer.champion.read()
        if current is None:
            raise HTTPException(404, "no champion yet: the base model is served")
        return {"revision": revision, **msgspec.to_builtins(current)}

    @routes.get("/history")
    async def history() -> list[dict]:
        """Champions kept by the KV bucket, newest first."""
        return msgspec.to_builtins(list(reversed(await deployer.champion.history())))

    @routes.get("/decisions")
    async def decisions(limit: int = 100) -> list[dict]:
        """The last decisions (promoted, kept, refused, rescored, rolled_back) with their reasons, newest first."""
        kept, _ = await deployer.decisions.read()
        newest_first = list(reversed(kept.decisions)) if kept else []
        return msgspec.to_builtins(newest_first[: max(limit, 0)])

    @routes.post("/rollback")
    async def rollback(requested_by: str = "http") -> dict:
        try:
            restored = await deployer.rollback(requested_by)
        except NothingToRollBack as exc:
            raise HTTPException(409, str(exc)) from exc
        return msgspec.to_builtins(restored)

    return routes
