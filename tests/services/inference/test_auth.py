"""The API key: where it comes from, constant-time checks, and 401s on the protected routes."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from structlog.testing import capture_logs

from libs.common.artifacts import ArtifactStore
from libs.common.http import ServiceMetrics, create_app
from libs.common.settings import SettingsError, load_settings
from services.inference import auth
from services.inference.api import router
from services.inference.auth import GENERATED_KEY_PATH, bearer_token, is_authorized, resolve_api_key
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer
from services.inference.settings import InferenceSettings

KEY = "s3cret-key"


def test_inline_key_wins(tmp_path: Path):
    assert resolve_api_key(KEY, "", tmp_path) == KEY
    assert not (tmp_path / GENERATED_KEY_PATH).exists()


def test_key_file_is_read_and_must_exist_and_hold_a_key(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    assert resolve_api_key("", str(key_file), tmp_path) == KEY
    with pytest.raises(SettingsError, match="cannot read"):
        resolve_api_key("", str(tmp_path / "missing"), tmp_path)
    key_file.write_text("  \n")
    with pytest.raises(SettingsError, match="empty"):
        resolve_api_key("", str(key_file), tmp_path)


def test_generated_key_is_private_reused_and_never_logged(tmp_path: Path):
    with capture_logs() as logs:
        first = resolve_api_key("", "", tmp_path)
        second = resolve_api_key("", "", tmp_path)
    path = tmp_path / GENERATED_KEY_PATH
    assert first == second == path.read_text().strip()
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in repr(logs)
    assert first not in repr(logs)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_settings_refuse_two_key_sources_and_read_env():
    with pytest.raises(SettingsError, match="not both"):
        InferenceSettings(api_key="a", api_key_file="b")
    settings = load_settings(InferenceSettings, "inference", environ={
        "FLYWHEEL_INFERENCE_MAX_TOKENS_LIMIT": "64", "FLYWHEEL_INFERENCE_API_KEY_FILE": "/k",
    })
    assert settings.max_tokens_limit == 64 and settings.api_key_file == "/k" and settings.http_port == 8100
    with pytest.raises(SettingsError):
        load_settings(InferenceSettings, "inference", environ={"FLYWHEEL_INFERENCE_MAX_TOKENS_LIMIT": "0"})


@pytest.mark.parametrize(("header", "token"), [
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Basic abc", None),
    (f"Bearer {KEY}", KEY), (f"bearer {KEY}", KEY),
])
def test_bearer_token_parsing(header, token):
    assert bearer_token(header) == token


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []

    def recording_compare(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", recording_compare)
    assert is_authorized(f"Bearer {KEY}", KEY)
    assert not is_authorized("Bearer wrong", KEY)
    assert calls == [(KEY.encode(), KEY.encode()), (b"wrong", KEY.encode())]
    assert not is_authorized(None, KEY)  # nothing to compare


@pytest.fixture
def client(tmp_path: Path):
    """The real routes with no model loaded: enough to see who gets past the key."""
    metrics = ServiceMetrics("inference")
    app = create_app("inference", metrics, {})
    server = ModelServer(
        store=ArtifactStore(tmp_path / "artifacts"), base_model=lambda: tmp_path, backend_factory=lambda: None,
        metrics=InferenceMetrics(metrics), model_name="flywheel", max_tokens_limit=8,
    )

    async def reload(force: bool):
        raise AssertionError("not reached in these tests")

    app.include_router(router(SimpleNamespace(server=server, api_key=KEY, metrics=server.metrics, reload=reload)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/models/info"), ("POST", "/models/reload"),
])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"])
async def test_missing_or_wrong_key_is_401(client, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_right_key_passes_and_open_routes_stay_open(client):
    response = await client.get("/models/info", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_loaded"
    for path in ("/health", "/metrics"):
        assert (await client.get(path)).status_code == 200
