"""HTTP routes of the gatekeeper.

- `POST /datasets?name=&schema=&priority=&level=&submitted_by=`: the raw JSONL request body,
  streamed to a file under the data directory (never held in memory).
- `POST /datasets/upload` (same query parameters): multipart form with the file in field `file`;
  the dataset name defaults to the file name.
- `GET /datasets/{submission_id}/report`: the full report of any submission, whatever channel.
- `GET /specs`: the schemas, their checks by level, and the limits in force.
- `GET /asyncapi.yaml`: the event contract, `docs/asyncapi.yaml` of the repository.

A submission answers 200 when accepted or a duplicate, 422 when rejected (the body says why;
the original and the report are kept either way), 413 when the body is over max_file_bytes
(nothing is kept: the client still holds it), 503 when the outcome could not be published.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from libs.common.events import Priority, ValidationLevel, new_id
from services.gatekeeper.schemas import DEFAULT_SCHEMA, describe_schemas
from services.gatekeeper.submissions import Submission

if TYPE_CHECKING:
    from services.gatekeeper.service import GatekeeperService

ASYNCAPI = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
_CHUNK = 1 << 20


def add_routes(app: FastAPI, service: GatekeeperService) -> None:
    router = APIRouter(tags=["gatekeeper"])
    settings = service.settings

    async def submit(chunks: AsyncIterator[bytes], source: str, name: str, schema: str,
                     priority: Priority | None, level: ValidationLevel, submitted_by: str) -> JSONResponse:
        path = await _receive(chunks, service.uploads, settings.max_file_bytes)
        submission = Submission(
            submission_id=new_id(), name=name, channel="http", source=source, schema=schema,
            priority=priority or settings.default_priority, level=level, submitted_by=submitted_by,
        )
        try:
            report = await service.submit_file(submission, path, move=True)
        except Exception as exc:
            path.unlink(missing_ok=True)
            raise HTTPException(503, f"submission {submission.submission_id} failed: {exc!r}") from exc
        body = {
            "submission_id": report.submission_id,
            "status": report.status,
            "report_url": f"/datasets/{report.submission_id}/report",
            "report": report.summary(),
        }
        return JSONResponse(body, status_code=422 if report.status == "rejected" else 200)

    @router.post("/datasets")
    async def submit_body(request: Request, name: str = "unnamed", schema: str = DEFAULT_SCHEMA,
                          priority: Priority | None = None, level: ValidationLevel = "standard",
                          submitted_by: str = "anonymous") -> JSONResponse:
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_file_bytes:
            raise HTTPException(413, _too_large(settings.max_file_bytes))
        return await submit(request.stream(), "body.jsonl", name, schema, priority, level, submitted_by)

    @router.post("/datasets/upload")
    async def submit_upload(file: UploadFile = File(...), name: str = "", schema: str = DEFAULT_SCHEMA,
                            priority: Priority | None = None, level: ValidationLevel = "standard",
                            submitted_by: str = "anonymous") -> JSONResponse:
        filename = Path(file.filename or "upload.jsonl").name
        return await submit(_chunks(file), filename, name or Path(filename).stem, schema, priority, level,
                            submitted_by)

    @router.get("/datasets/{submission_id}/report")
    async def get_report(submission_id: str) -> Response:
        report = service.gatekeeper.read_report(submission_id)
        if report is None:
            raise HTTPException(404, f"no report for submission {submission_id!r}")
        return FileResponse(service.gatekeeper.store.path_for(report.report_uri), media_type="application/json")

    @router.get("/specs")
    async def specs() -> dict:
        return {
            "default_schema": DEFAULT_SCHEMA,
            "schemas": describe_schemas(),
            "levels": ["quick", "standard", "deep"],
            "limits": {
                "max_line_bytes": settings.max_line_bytes,
                "max_file_bytes": settings.max_file_bytes,
                "max_error_fraction": settings.max_error_fraction,
                "max_tokens": settings.max_tokens,
            },
        }

    @router.get("/asyncapi.yaml")
    async def asyncapi() -> Response:
        if not ASYNCAPI.is_file():
            raise HTTPException(404, "docs/asyncapi.yaml has not been generated; run `flywheel asyncapi`")
        return FileResponse(ASYNCAPI, media_type="application/yaml")

    app.include_router(router)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


async def _receive(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Path:
    """Stream `chunks` into a new file in `folder`, refusing more than `max_bytes`."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, _too_large(max_bytes))
                fh.write(chunk)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _too_large(max_bytes: int) -> str:
    return f"the upload is over the limit of {max_bytes} bytes (max_file_bytes); split it or raise the limit"
