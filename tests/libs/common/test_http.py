"""The app every service gets: one error shape for every error it answers, the metrics' content type."""

from __future__ import annotations

import httpx
from fastapi import APIRouter

from libs.common.http import ApiError, ServiceMetrics, answer_errors_as, create_app


class Shaped(ApiError):
    """A service's own shape, as inference's OpenAI errors are."""

    def body(self) -> dict:
        return {"error": {"message": str(self), "status": self.status}}


def _app(errors: type[ApiError] = ApiError):
    app = create_app("demo", ServiceMetrics("demo"), {})
    answer_errors_as(app, errors)  # as the runtime does with a service's declared shape
    routes = APIRouter()

    @routes.get("/items/{number}")
    async def item(number: int) -> dict:
        if number == 0:
            raise ApiError("no item 0")
        if number == 1:
            raise RuntimeError("a bug")
        return {"number": number}

    app.include_router(routes)
    # A failure's traceback still reaches the server (Starlette re-raises it); the client gets the answer.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


async def test_by_default_every_error_is_fastapis_detail_shape():
    async with _app() as client:
        assert (await client.get("/items/0")).json() == {"detail": "no item 0"}
        assert (await client.get("/nothing")).json() == {"detail": "Not Found"}
        assert (await client.get("/items/x")).json()["detail"][0]["loc"] == ["path", "number"]
        failed = await client.get("/items/1")
        assert failed.status_code == 500 and failed.json() == {"detail": "internal server error (logged by the service)"}


async def test_a_services_own_shape_covers_fastapis_errors_too():
    # Found by tests/fuzz: inference answered an unknown path or a wrong method in FastAPI's shape, not OpenAI's.
    async with _app(Shaped) as client:
        assert (await client.get("/nothing")).json() == {"error": {"message": "Not Found", "status": 404}}
        wrong = await client.put("/health")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert wrong.json() == {"error": {"message": "Method Not Allowed", "status": 405}}
        invalid = await client.get("/items/x")
        assert invalid.status_code == 422 and invalid.json()["error"]["message"].startswith("invalid request: path.number")
        assert (await client.get("/items/1")).json()["error"]["status"] == 500


async def test_metrics_are_documented_as_the_text_they_are():
    # Found by tests/fuzz: /metrics answered text/plain where its document said application/json.
    async with _app() as client:
        doc = (await client.get("/openapi.json")).json()
        assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert (await client.get("/metrics")).headers["content-type"].startswith("text/plain")
