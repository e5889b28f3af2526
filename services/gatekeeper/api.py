"""HTTP routes of the gatekeeper.

- `POST /datasets?name=&schema=&profile=&priority=&level=&submitted_by=`: the raw JSONL body
  (plain or gzip), streamed to disk (intake.py). `profile` names the data profile the trainer
  applies (libs/common/profiles.py; default none).
- `POST /datasets/upload` (same query parameters): multipart form with the file in field
  `file`, streamed too; the dataset name defaults to the file name.
- `POST /datasets/check?schema=&profile=&level=`: a dry run on the raw JSONL body: the report the
  submission would get (200 whatever the verdict), nothing kept, nothing announced.
- `GET /datasets/{id}/report`: the full report of a submission (by submission id, whatever
  its channel) or of the submission that got a dataset accepted (by dataset id).
- `GET /specs`: the schemas, the checks each level runs, the data profiles, the policy and limits in force.
- `GET /asyncapi.yaml`: the event contract, `docs/asyncapi.yaml` of the repository.

A submission answers 200 when accepted or a duplicate, 422 when rejected (the body says why;
the original and the report are kept either way), 413 when the body is over max_file_bytes
(cut off there; nothing is kept: the client still holds it), 400 for a malformed form, 503
when the outcome could not be published. Sending the same file again is then safe: an
acceptance never announced is announced by the retry, which answers 200 "accepted" with the
acceptance's report (its submission id), not "duplicate"; the service also announces it by
itself, later (service.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from libs.common.events import Priority, ValidationLevel, new_id
from libs.common.http import inline_refs
from libs.common.profiles import DEFAULT_PROFILE
from libs.common.profiles import PROFILES as DATA_PROFILES
from services.gatekeeper.intake import Submission, UploadRefused, receive_body, receive_multipart
from services.gatekeeper.pipeline import Gatekeeper, ValidationInterrupted, describe_schemas
from services.gatekeeper.schemas import DEFAULT_SCHEMA, PROFILES, SCHEMAS, json_schemas
from services.gatekeeper.settings import GatekeeperSettings
from services.gatekeeper.verdict import Report, encode_report


class Intake(Protocol):
    """What the routes need: settings, the uploads folder, the pipeline, and submit-and-announce."""

    settings: GatekeeperSettings
    uploads: Path
    gatekeeper: Gatekeeper

    async def submit_file(self, submission: Submission, path: Path, *, move: bool) -> Report: ...

ASYNCAPI = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


def _raw_body() -> dict:
    """`openapi_extra` of the routes that stream a raw body: JSON lines (one row of the named schema
    a line; the document shows them as an array, one item a line) or the same gzip-compressed."""
    definitions = json_schemas()
    rows = {"anyOf": [inline_refs(definitions[name], definitions) for name in SCHEMAS]}
    return {"requestBody": {"required": True, "content": {
        "application/x-ndjson": {"schema": {"type": "array", "items": rows}},
        "application/gzip": {"schema": {"type": "string", "format": "binary"}},
    }}}


# A submission's 422 is its rejection (the submission's answer, with `detail` saying why), not only
# FastAPI's invalid parameter (`detail`: the list of problems).
_SUBMISSION_RESPONSES = {422: {"description": "Rejected (see `report`), or an invalid parameter", "content": {
    "application/json": {"schema": {"type": "object", "required": ["detail"]}}}}}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}}


def router(service: Intake) -> APIRouter:
    routes = APIRouter(tags=["gatekeeper"])
    settings = service.settings

    async def submit(path: Path, source: str, name: str, schema: str, profile: str, priority: Priority | None,
                     level: ValidationLevel, submitted_by: str) -> JSONResponse:
        submission = Submission(
            submission_id=new_id(), name=name, channel="http", source=source, schema=schema, profile=profile,
            priority=priority or settings.default_priority, level=level, submitted_by=submitted_by,
        )
        try:
            report = await service.submit_file(submission, path, move=True)
        except Exception as exc:
            path.unlink(missing_ok=True)
            raise HTTPException(503, f"submission {submission.submission_id} failed: {exc!r}") from exc
        body = {
            # The error shape's field (libs/common/http.py), so a rejection reads like any other 4xx.
            **({"detail": "rejected: " + "; ".join(report.reasons)} if report.status == "rejected" else {}),
            "submission_id": report.submission_id,
            "status": report.status,
            "report_url": f"/datasets/{report.submission_id}/report",
            "report": report.summary(),
        }
        return JSONResponse(body, status_code=422 if report.status == "rejected" else 200)

    async def receive_raw(request: Request) -> Path:
        """A raw (JSONL or gzip) body streamed to an upload file, refused past max_file_bytes."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_file_bytes:
            raise HTTPException(413, f"the upload is over the limit of {settings.max_file_bytes} bytes")
        try:
            return await receive_body(request.stream(), service.uploads, settings.max_file_bytes)
        except UploadRefused as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    @routes.post("/datasets", openapi_extra=_raw_body(), responses=_SUBMISSION_RESPONSES)
    async def submit_body(request: Request, name: str = "unnamed", schema: str = DEFAULT_SCHEMA,
                          profile: str = DEFAULT_PROFILE, priority: Priority | None = None,
                          level: ValidationLevel = "standard", submitted_by: str = "anonymous") -> JSONResponse:
        path = await receive_raw(request)
        return await submit(path, "body.jsonl", name, schema, profile, priority, level, submitted_by)

    @routes.post("/datasets/upload", openapi_extra=_UPLOAD_BODY, responses=_SUBMISSION_RESPONSES)
    async def submit_upload(request: Request, name: str = "", schema: str = DEFAULT_SCHEMA,
                            profile: str = DEFAULT_PROFILE, priority: Priority | None = None,
                            level: ValidationLevel = "standard", submitted_by: str = "anonymous") -> JSONResponse:
        try:
            path, filename = await receive_multipart(
                request.stream(), request.headers.get("content-type", ""), service.uploads, settings.max_file_bytes,
            )
        except UploadRefused as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        filename = filename or "upload.jsonl"
        return await submit(path, filename, name or filename.split(".")[0] or "upload", schema, profile, priority,
                            level, submitted_by)

    @routes.post("/datasets/check", openapi_extra=_raw_body())
    async def check_body(request: Request, schema: str = DEFAULT_SCHEMA, profile: str = DEFAULT_PROFILE,
                         level: ValidationLevel = "standard") -> Response:
        path = await receive_raw(request)
        submission = Submission(submission_id=new_id(), name="check", channel="http", source="body.jsonl",
                                schema=schema, profile=profile, level=level)
        try:
            report = await asyncio.to_thread(service.gatekeeper.check_file, submission, path)
        except ValidationInterrupted as exc:
            raise HTTPException(503, f"the gatekeeper is stopping ({exc}); ask again") from exc
        finally:
            path.unlink(missing_ok=True)
        return Response(encode_report(report), media_type="application/json")

    @routes.get("/datasets/{report_id}/report")
    async def get_report(report_id: str) -> Response:
        report = service.gatekeeper.read_report(report_id)
        if report is None:
            raise HTTPException(404, f"no report for {report_id!r} (a submission id or an accepted dataset id)")
        return FileResponse(service.gatekeeper.store.path_for(report.report_uri), media_type="application/json")

    @routes.get("/specs")
    async def specs() -> dict:
        return {
            "default_schema": DEFAULT_SCHEMA,
            "default_level": "standard",
            "schemas": describe_schemas(),
            "row_json_schemas": json_schemas(),
            "profiles": list(PROFILES),
            # What a submission's `profile` may name (the row transforms the trainer applies); not
            # the answer profiles above, which a chat_sft_v1 row's own `profile` field names.
            "default_profile": DEFAULT_PROFILE,
            "data_profiles": [{"name": p.name, "description": p.description} for p in DATA_PROFILES.values()],
            "levels": ["quick", "standard", "deep"],
            "policy": {
                "max_line_bytes": settings.max_line_bytes,
                "max_file_bytes": settings.max_file_bytes,
                "max_error_fraction": settings.max_error_fraction,
                "max_length": settings.max_length,
                "overlength": settings.overlength,
                "near_duplicate_similarity": settings.near_duplicate_similarity,
                "recent_datasets": settings.recent_datasets,
                "leakage_min_chars": settings.leakage_min_chars,
                "leakage_fraction": settings.leakage_fraction,
            },
        }

    @routes.get("/asyncapi.yaml", response_class=Response,
                responses={200: {"content": {"application/yaml": {}}}})
    async def asyncapi() -> Response:
        if not ASYNCAPI.is_file():
            raise HTTPException(404, "docs/asyncapi.yaml has not been generated; run `flywheel asyncapi`")
        return FileResponse(ASYNCAPI, media_type="application/yaml")

    return routes
