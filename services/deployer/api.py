"""The deployer's HTTP routes: the champion, its history, and rollback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, HTTPException

from services.deployer.champion import NothingToRollBack

if TYPE_CHECKING:
    from services.deployer.service import Deployer


def add_routes(app: FastAPI, deployer: Deployer) -> None:
    @app.get("/champion")
    async def champion() -> dict:
        current, revision = await deployer.board.read()
        if current is None:
            raise HTTPException(404, "no champion yet: the base model is served")
        return {"revision": revision, **msgspec.to_builtins(current)}

    @app.get("/history")
    async def history() -> list[dict]:
        """Champions kept by the KV bucket, newest first."""
        return msgspec.to_builtins(list(reversed(await deployer.board.history())))

    @app.post("/rollback")
    async def rollback(requested_by: str = "http") -> dict:
        try:
            restored = await deployer.rollback(requested_by)
        except NothingToRollBack as exc:
            raise HTTPException(409, str(exc)) from exc
        return msgspec.to_builtins(restored)
