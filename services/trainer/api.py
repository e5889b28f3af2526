"""The trainer's HTTP routes: `GET /status`, `POST /pause`, `POST /resume`, `POST /stop`,
`POST /skip` (JSON body `{"reason": "..."}`).

The POST routes do exactly what the NATS commands on `control.trainer.<action>` do; a refused
command (e.g. pause while stopped, skip with nothing training or without a reason) answers 409
with the reason.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from libs.common.events import ControlReply
from services.trainer.control import Action


class Controllable(Protocol):
    """What the routes need: a snapshot to show and the control command."""

    def snapshot(self) -> dict: ...

    async def control(self, action: Action, requested_by: str, reason: str = "") -> ControlReply: ...


def router(service: Controllable) -> APIRouter:
    routes = APIRouter()

    @routes.get("/status")
    async def status() -> dict:
        return service.snapshot()

    async def command(action: Action, reason: str = "") -> JSONResponse:
        reply = await service.control(action, requested_by="http", reason=reason)
        if reply.ok:
            return JSONResponse(msgspec.to_builtins(reply))
        # A refusal also carries the error shape's field (libs/common/http.py), like any other 4xx.
        return JSONResponse({"detail": reply.message, **msgspec.to_builtins(reply)}, status_code=409)

    @routes.post("/pause")
    async def pause() -> JSONResponse:
        return await command("pause")

    @routes.post("/resume")
    async def resume() -> JSONResponse:
        return await command("resume")

    @routes.post("/stop")
    async def stop() -> JSONResponse:
        return await command("stop")

    @routes.post("/skip")
    async def skip(reason: str = Body("", embed=True)) -> JSONResponse:
        # A missing reason is the command's refusal (409, like NATS), not a malformed request.
        return await command("skip", reason)

    return routes
