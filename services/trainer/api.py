"""The trainer's HTTP routes: `GET /status`, `POST /pause`, `POST /resume`, `POST /stop`.

The POST routes do exactly what the NATS commands on `control.trainer.<action>` do; a refused
command (e.g. pause while stopped) answers 409 with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from fastapi import APIRouter
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from services.trainer.service import TrainerService


def router(service: TrainerService) -> APIRouter:
    routes = APIRouter()

    @routes.get("/status")
    async def status() -> dict:
        return service.snapshot()

    async def command(action: str) -> JSONResponse:
        reply = await service.control(action, requested_by="http")
        return JSONResponse(msgspec.to_builtins(reply), status_code=200 if reply.ok else 409)

    @routes.post("/pause")
    async def pause() -> JSONResponse:
        return await command("pause")

    @routes.post("/resume")
    async def resume() -> JSONResponse:
        return await command("resume")

    @routes.post("/stop")
    async def stop() -> JSONResponse:
        return await command("stop")

    return routes
