"""The evaluator's HTTP routes on a real suite and scorebook: what a malformed request gets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx

from libs.common.http import ServiceMetrics, create_app
from services.evaluator.api import router
from services.evaluator.scorebook import ChampionTestRecord, ConfirmationRecord, Scorebook
from services.evaluator.suite import build_confirmation_suite, build_suite, build_test_suite


async def test_a_malformed_checkpoint_hash_gets_fastapis_422(tmp_path: Path):
    # Found by tests/fuzz: GET /scores/0 answered 422 {"detail": "not a sha256 hex digest"}, a body
    # against the 422 its own OpenAPI document declares ({"detail": [problems]}).
    app = create_app("evaluator", ServiceMetrics("evaluator"), {})
    suite = build_suite({"binary": 1, "syllo": 1}, 2, seed=0)
    test = build_test_suite(suite, seed=1)
    app.include_router(router(SimpleNamespace(
        suite=suite, test_suite=test, confirmation_suite=build_confirmation_suite(suite, test, 2, 3),
        scorebook=Scorebook(tmp_path / "scores"), testbook=Scorebook(tmp_path / "test-scores", ChampionTestRecord),
        confirmbook=Scorebook(tmp_path / "confirm-scores", ConfirmationRecord))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for route in ("scores", "tests", "confirmations"):
            for malformed in ("0", "A" * 64, "g" * 64):
                response = await client.get(f"/{route}/{malformed}")
                assert response.status_code == 422, response.text
                [problem] = response.json()["detail"]
                assert problem["loc"] == ["path", "sha256"]
            assert (await client.get(f"/{route}/{'1' * 64}")).status_code == 404  # well-formed, never scored
        test_suite = (await client.get("/test-suite")).json()
        assert test_suite["name"] == "skills-test" and test_suite["items_per_level"] == {"binary/1": 2, "syllo/1": 2}
        confirmation = (await client.get("/confirmation-suite")).json()
        assert confirmation["name"] == "skills-confirm" and confirmation["items_per_level"] == {"binary/1": 3, "syllo/1": 3}
        pattern = (await client.get("/openapi.json")).json()["paths"]["/scores/{sha256}"]["get"]["parameters"][0]
        assert pattern["schema"]["pattern"] == "^[0-9a-f]{64}$"
