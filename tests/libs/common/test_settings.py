from pathlib import Path

import pytest

from libs.common.settings import CommonSettings, SettingsError, describe, load_settings


class DemoSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    http_port: int = 0
    batch_size: int = 8
    api_key: str = ""


def test_defaults_and_default_port():
    s = load_settings(DemoSettings, "trainer", environ={})
    assert s.batch_size == 8 and s.http_port == 8102 and s.data_dir == Path("data")


def test_env_overrides_are_typed():
    s = load_settings(DemoSettings, "trainer", environ={
        "FLYWHEEL_TRAINER_BATCH_SIZE": "32", "FLYWHEEL_DATA_DIR": "/x", "FLYWHEEL_NATS_URL": "nats://a:1,nats://b:2"})
    assert s.batch_size == 32 and s.data_dir == Path("/x")
    assert s.nats_servers == ["nats://a:1", "nats://b:2"]


def test_nats_url_alias():
    assert load_settings(DemoSettings, "trainer", environ={"NATS_URL": "nats://h:4222"}).nats_url == "nats://h:4222"


def test_unknown_service_variable_fails_loudly():
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_BATCHSIZE"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCHSIZE": "3"})


def test_wrong_type_fails_loudly():
    with pytest.raises(SettingsError, match="batch_size"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCH_SIZE": "many"})


def test_bad_log_level_fails():
    with pytest.raises(SettingsError, match="log_level"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_LOG_LEVEL": "chatty"})


def test_toml_sections_then_env(tmp_path: Path):
    config = tmp_path / "flywheel.toml"
    config.write_text('[common]\ndata_dir = "/srv/fw"\n[trainer]\nbatch_size = 4\n[evaluator]\nbatch_size = 99\n')
    s = load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(config)})
    assert s.batch_size == 4 and s.data_dir == Path("/srv/fw")
    s = load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(config), "FLYWHEEL_TRAINER_BATCH_SIZE": "2"})
    assert s.batch_size == 2


def test_missing_or_broken_toml_fails(tmp_path: Path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(tmp_path / "nope.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer\n")
    with pytest.raises(SettingsError, match="invalid TOML"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(bad)})


def test_unknown_toml_key_fails(tmp_path: Path):
    config = tmp_path / "f.toml"
    config.write_text("[trainer]\nbatchsize = 4\n")
    with pytest.raises(SettingsError, match="batchsize"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(config)})


def test_describe_masks_secrets():
    s = load_settings(DemoSettings, "inference", environ={"FLYWHEEL_INFERENCE_API_KEY": "sk-secret"})
    assert describe(s)["api_key"] == "***"


def test_nats_servers_without_url_is_a_clear_error():
    with pytest.raises(SettingsError, match="NATS_URL"):
        _ = load_settings(DemoSettings, "trainer", environ={}).nats_servers
