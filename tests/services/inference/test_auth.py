"""The API keys: where they come from, their roles, constant-time checks, 401s and 403s on the routes."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from structlog.testing import capture_logs

from libs.common.artifacts import ArtifactStore
from libs.common.http import ServiceMetrics, create_app
from libs.common.settings import SettingsError, describe, load_settings
from services.inference import auth
from services.inference.api import router
from services.inference.auth import (
    GENERATED_KEY_PATH,
    MAIN_KEY_NAME,
    ApiKey,
    KeyTable,
    bearer_token,
    parse_api_keys,
    resolve_api_key,
    resolve_api_keys,
)
from services.inference.champion import BASE
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer
from services.inference.settings import InferenceSettings
from services.inference.transformers_backend import TransformersBackend

KEY = "s3cret-key"
READ_KEY, ADMIN_KEY = "r3ad-key", "adm1n-key"
KEYS_TOML = f"""
[dashboard]
key = "{READ_KEY}"
role = "read"

[ops]
key = "{ADMIN_KEY}"
role = "admin"
"""


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


def test_settings_read_the_keys_file_setting_and_log_only_its_path():
    settings = load_settings(InferenceSettings, "inference", environ={"FLYWHEEL_INFERENCE_API_KEYS_FILE": "/keys.toml"})
    assert settings.api_keys_file == "/keys.toml"
    assert describe(settings)["api_keys_file"] == "/keys.toml"  # a path, not a secret


def test_keys_file_names_keys_with_roles():
    keys = parse_api_keys(KEYS_TOML, "keys.toml")
    assert [(k.name, k.role, k.key) for k in keys] == [("dashboard", "read", READ_KEY), ("ops", "admin", ADMIN_KEY)]
    assert READ_KEY not in repr(keys)
    assert parse_api_keys("", "keys.toml") == []


@pytest.mark.parametrize(("text", "why"), [
    ('[a]\nkey = "k"\nrole = "write"', "unknown role 'write'"),
    ('[a]\nkey = "k"', "unknown role None"),
    ('[a]\nkey = ""\nrole = "read"', "empty or missing key"),
    ('[a]\nkey = "  "\nrole = "read"', "empty or missing key"),
    ('[a]\nrole = "read"', "empty or missing key"),
    ('[a]\nkey = 5\nrole = "read"', "empty or missing key"),
    ('[a]\nkey = " k"\nrole = "read"', "whitespace"),
    ('[a]\nkey = "k"\nrole = "read"\nrol = "admin"', r"unknown field\(s\) \['rol'\]"),
    ('a = "k"', "must be a table"),
    (f'[{MAIN_KEY_NAME}]\nkey = "k"\nrole = "read"', "main key's"),
    ('[a]\nkey = "leaked-k\nrole = "read"', "invalid TOML"),
])
def test_a_bad_keys_file_stops_with_the_setting_named_and_no_key_shown(text, why):
    with pytest.raises(SettingsError, match=why) as raised:
        parse_api_keys(text, "keys.toml")
    assert str(raised.value).startswith("api_keys_file keys.toml: ")
    assert "leaked" not in str(raised.value)


def test_main_key_is_admin_and_the_file_adds_named_keys(tmp_path: Path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    with capture_logs() as logs:
        table = resolve_api_keys(KEY, "", str(keys_file), tmp_path)
    assert table.names == {MAIN_KEY_NAME: "admin", "dashboard": "read", "ops": "admin"}
    assert table.match(f"Bearer {KEY}").name == MAIN_KEY_NAME
    assert table.match(f"Bearer {READ_KEY}").role == "read"
    assert table.match(f"Bearer {ADMIN_KEY}").name == "ops"
    assert table.match("Bearer wrong") is None and table.match(None) is None
    assert "dashboard" in repr(logs) and str(keys_file) in repr(logs)
    for key in (KEY, READ_KEY, ADMIN_KEY):
        assert key not in repr(logs)
    # Without the file only the main key is configured, as before.
    assert resolve_api_keys(KEY, "", "", tmp_path).names == {MAIN_KEY_NAME: "admin"}


def test_keys_file_must_exist_and_keys_must_differ(tmp_path: Path):
    with pytest.raises(SettingsError, match="api_keys_file .*cannot read"):
        resolve_api_keys(KEY, "", str(tmp_path / "missing.toml"), tmp_path)
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[again]\nkey = "{KEY}"\nrole = "read"\n')
    with pytest.raises(SettingsError, match="api_keys_file .*'again' repeats another key") as raised:
        resolve_api_keys(KEY, "", str(keys_file), tmp_path)
    assert KEY not in str(raised.value)
    keys_file.write_text(KEYS_TOML + f'[twin]\nkey = "{READ_KEY}"\nrole = "admin"\n')
    with pytest.raises(SettingsError, match="'twin' repeats"):
        resolve_api_keys(KEY, "", str(keys_file), tmp_path)


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []

    def recording_compare(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", recording_compare)
    table = KeyTable([ApiKey("a", "admin", KEY), ApiKey("b", "read", READ_KEY), ApiKey("c", "read", "k" * 90)])
    for header, found in [(f"Bearer {KEY}", "a"), (f"Bearer {READ_KEY}", "b"), ("Bearer wrong", None)]:
        calls.clear()
        assert getattr(table.match(header), "name", None) == found
        # No early exit: every key is compared, whichever matched; digests make every length equal.
        assert len(calls) == 3
        assert {len(a) for pair in calls for a in pair} == {32}
    calls.clear()
    assert table.match(None) is None and calls == []  # nothing to compare


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

    app.include_router(router(SimpleNamespace(server=server, keys=KeyTable([ApiKey(MAIN_KEY_NAME, "admin", KEY)]),
                                           metrics=server.metrics, reload=reload)))
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


@pytest.mark.slow
async def test_roles_on_the_real_routes(tiny_model_dir: Path, tmp_path: Path):
    """A read key generates but may not reload; admin keys (the main one too) may; a wrong key is 401."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    metrics = ServiceMetrics("inference")
    server = ModelServer(
        store=ArtifactStore(tmp_path / "artifacts"), base_model=lambda: tiny_model_dir,
        backend_factory=lambda: TransformersBackend("cpu"), metrics=InferenceMetrics(metrics),
        model_name="flywheel", max_tokens_limit=4,
    )
    await server.deploy(BASE)
    app = create_app("inference", metrics, {})
    reloads = []

    async def reload(force: bool):
        reloads.append(force)
        return await server.deploy(BASE, force=force)

    keys = resolve_api_keys(KEY, "", str(keys_file), tmp_path)
    app.include_router(router(SimpleNamespace(server=server, keys=keys, metrics=server.metrics, reload=reload)))
    chat = {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            def auth_as(key: str) -> dict:
                return {"Authorization": f"Bearer {key}"}

            for key in (READ_KEY, ADMIN_KEY, KEY):
                response = await client.post("/v1/chat/completions", json=chat, headers=auth_as(key))
                assert response.status_code == 200, response.text
                assert (await client.get("/models/info", headers=auth_as(key))).status_code == 200

            with capture_logs() as logs:
                response = await client.post("/models/reload", headers=auth_as(READ_KEY))
            assert response.status_code == 403 and reloads == []
            assert response.json() == {"error": {
                "message": "this key's role (read) may not reload; an admin key is required",
                "type": "invalid_request_error", "param": None, "code": "insufficient_permissions"}}
            assert READ_KEY not in repr(logs)

            for key in (ADMIN_KEY, KEY):
                response = await client.post("/models/reload", json={"force": True}, headers=auth_as(key))
                assert response.status_code == 200, response.text
            assert reloads == [True, True]

            for path in ("/models/reload", "/v1/chat/completions"):
                response = await client.post(path, json=chat, headers=auth_as("wrong"))
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    finally:
        await server.close()
