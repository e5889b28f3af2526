"""The dashboard's HTTP routes: the page, the state, its live changes (SSE), lineage, traces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import msgspec
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from libs.common.bus import Bus
from libs.common.trace_page import render_trace_page
from libs.common.tracing import read_trace
from services.dashboard.read_model import ReadModel
from services.dashboard.settings import DashboardSettings

STATIC = Path(__file__).with_name("static")
# A comment this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
_encoder = msgspec.json.Encoder()


class Board(Protocol):
    """What the routes need of the dashboard service."""

    settings: DashboardSettings
    model: ReadModel
    bus: Bus
    data_dir: Path
    stop: asyncio.Event

    async def wait_for_change(self, timeout: float) -> bool: ...

    async def validation_report(self, submission_id: str) -> tuple[int, bytes]: ...


def _json(value: object) -> Response:
    return Response(_encoder.encode(value), media_type="application/json")


def router(board: Board) -> APIRouter:
    routes = APIRouter()

    @routes.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @routes.get("/api/state")
    async def state() -> Response:
        """Every section of the read model (see services/dashboard/read_model.py)."""
        return _json(board.model.snapshot())

    @routes.get("/api/stream", response_class=EventSourceResponse)
    async def stream() -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events: first every section, then the sections that changed, each in full."""
        seen: dict[str, int] = {}
        while not board.stop.is_set():
            changed = board.model.changed_since(seen)
            if changed:
                seen.update({name: board.model.versions[name] for name in changed})
                yield ServerSentEvent(raw_data=_encoder.encode(board.model.snapshot(changed)).decode(),
                                      id=str(board.model.version), retry=2000)
                # A burst of events (a replay, a fast run) goes out as one update.
                await asyncio.sleep(board.settings.push_interval_s)
            elif not await board.wait_for_change(KEEPALIVE_S):
                yield ServerSentEvent(comment="keep-alive")

    @routes.get("/api/lineage")
    async def lineage(model: str | None = None) -> Response:
        """Why a model (default: the served one) is what it is: `flywheel lineage` as JSON."""
        from libs.common.lineage import read_lineage

        try:
            found = await read_lineage(board.bus, model)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        return _json(msgspec.to_builtins(found))

    @routes.get("/api/datasets/{submission_id}/report")
    async def validation_report(submission_id: str) -> Response:
        """A dataset's full validation report, as the gatekeeper keeps it (accepted or rejected)."""
        status, body = await board.validation_report(submission_id)
        return Response(body, status_code=status, media_type="application/json")

    @routes.get("/traces/{trace_id}", include_in_schema=False)
    async def trace_page(trace_id: str) -> HTMLResponse:
        """A trace's waterfall from the local trace files (when no tracing UI is configured)."""
        if len(trace_id) != 32 or any(c not in "0123456789abcdef" for c in trace_id):
            raise HTTPException(400, "a trace id is 32 lowercase hex digits")
        spans = await asyncio.to_thread(read_trace, Path(board.data_dir), trace_id)
        return HTMLResponse(render_trace_page(trace_id, spans))

    @routes.get("/static/{path:path}", include_in_schema=False)
    async def static(path: str) -> FileResponse:
        file = (STATIC / path).resolve()
        if not file.is_relative_to(STATIC.resolve()) or not file.is_file():
            raise HTTPException(404, f"no such file: {path}")
        return FileResponse(file)

    return routes
