"""The evaluator's HTTP routes on a real suite and scorebook: what a malformed request gets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx

from libs.common.http import ServiceMetrics, create_app
from services.evaluator.api import router
from services.evaluator.scorebook import Scorebook
from services.evaluator.suite import build_suite


async def test_a_malformed_checkpoint_hash_gets_fastapis_422(tmp_path: Path):
    # Found by tests/fuzz: GET /scores/0 answered 422 {"detail": "not a sha256 hex digest"}, a body
    # against the 422 its own OpenAPI document declares ({"detail": [problems]}).
    app = create_app("evaluator", ServiceMetrics("evaluator"), {})
    app.include_router(router(SimpleNamespace(suite=build_suite({"binary": 1, "syllo": 1}, 2, seed=0),
                                              scorebook=Scorebook(tmp_path / "scores"))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for malformed in ("0", "A" * 64, "g" * 64):
            response = await client.get(f"/scores/{malformed}")
            assert response.status_code == 422, response.text
            [problem] = response.json()["detail"]
            assert problem["loc"] == ["path", "sha256"]
        assert (await client.get(f"/scores/{'1' * 64}")).status_code == 404  # well-formed, never scored
        pattern = (await client.get("/openapi.json")).json()["paths"]["/scores/{sha256}"]["get"]["parameters"][0]
        assert pattern["schema"]["pattern"] == "^[0-9a-f]{64}$"
