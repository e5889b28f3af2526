"""The deployer's HTTP routes: the champion, its history, the newest deployment, the decisions
with their reasons, rollback."""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter, HTTPException

from libs.common.kv import Record
from libs.common.records import Champion, DeployDecisions, Deployment
from services.deployer.promotion import NothingToRollBack


class ChampionDesk(Protocol):
    """What the routes need: the champion, decision and deployment records, and the rollback command."""

    champion: Record[Champion]
    decisions: Record[DeployDecisions]
    deployments: Record[Deployment]

    async def rollback(self, requested_by: str) -> Deployment: ...


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

    @routes.get("/deployment")
    async def deployment() -> dict:
        """The newest deployment: staged (waiting for inference), served or failed, and why."""
        current, _ = await deployer.deployments.read()
        if current is None:
            raise HTTPException(404, "nothing was deployed yet")
        return msgspec.to_builtins(current)

    @routes.get("/decisions")
    async def decisions(limit: int = 100) -> list[dict]:
        """The last decisions (promoted, kept, refused, rescored, rolled_back, deploy_failed) with their
        reasons, newest first."""
        kept, _ = await deployer.decisions.read()
        newest_first = list(reversed(kept.decisions)) if kept else []
        return msgspec.to_builtins(newest_first[: max(limit, 0)])

    @routes.post("/rollback")
    async def rollback(requested_by: str = "http") -> dict:
        """Stage the previous champion; it is served once inference confirms (GET /deployment)."""
        try:
            staged = await deployer.rollback(requested_by)
        except NothingToRollBack as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"state": staged.state, "deployment_id": staged.id, "checkpoint_uri": staged.candidate.checkpoint_uri,
                "checkpoint_sha256": staged.checkpoint_sha256, "reason": staged.candidate.reason,
                "deadline": staged.deadline.isoformat()}

    return routes
