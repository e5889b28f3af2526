from pathlib import Path

import msgspec
import pytest

from libs.common.settings import CommonSettings, SettingsError, describe, load_settings


class DemoSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
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
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_BATCHSIZE.*did you mean FLYWHEEL_TRAINER_BATCH_SIZE"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCHSIZE": "3"})


@pytest.mark.parametrize(("variable", "nearest"), [
    ("FLYWHEEL_DATADIR", "FLYWHEEL_DATA_DIR"),                              # a common setting, mistyped
    ("FLYWHEEL_EVALUATR_BATCH_SIZE", "FLYWHEEL_EVALUATOR_BATCH_SIZE"),      # a mistyped service prefix
    ("FLYWHEEL_INFERENCE_MAX_TOKEN_LIMIT", "FLYWHEEL_INFERENCE_MAX_TOKENS_LIMIT"),
])
def test_any_unknown_flywheel_variable_stops_every_service_with_the_nearest_name(variable, nearest):
    # Another service's variable, mistyped, stops this one too: it would be ignored everywhere.
    for service, cls in (("trainer", DemoSettings), ("cli", CommonSettings)):
        with pytest.raises(SettingsError, match=f"{variable} is not a Flywheel setting; did you mean {nearest}"):
            load_settings(cls, service, environ={variable: "1"})


def test_another_services_valid_variable_is_not_this_ones_business():
    s = load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_EVALUATOR_BATCH_SIZE": "99"})
    assert s.batch_size == 8


def test_values_services_must_agree_on_have_one_owner():
    s = load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_MAX_LENGTH": "256"})
    assert s.max_length == 256
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_MAX_LENGTH is not a Flywheel setting"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_MAX_LENGTH": "256"})


def test_http_port_is_set_per_service_only():
    assert load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_HTTP_PORT": "9000"}).http_port == 9000
    with pytest.raises(SettingsError, match="per service"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_HTTP_PORT": "9000"})


def test_torch_threads_is_common_and_a_service_may_set_its_own_which_wins():
    common = {"FLYWHEEL_TORCH_THREADS": "1"}
    assert load_settings(DemoSettings, "trainer", environ=common).torch_threads == 1
    both = {"FLYWHEEL_TRAINER_TORCH_THREADS": "2", **common}
    assert load_settings(DemoSettings, "trainer", environ=both).torch_threads == 2
    assert load_settings(DemoSettings, "evaluator", environ=both).torch_threads == 1
    # The same with the service's variable first in the environment.
    assert load_settings(DemoSettings, "trainer", environ={**common, **both}).torch_threads == 2


def test_a_bad_value_names_the_variable_to_fix():
    from services.evaluator.settings import EvaluatorSettings

    with pytest.raises(SettingsError, match="FLYWHEEL_EVALUATOR_BATCH_SIZE: Expected `int` >= 1"):
        load_settings(EvaluatorSettings, "evaluator", environ={"FLYWHEEL_EVALUATOR_BATCH_SIZE": "0"})
    with pytest.raises(SettingsError, match="FLYWHEEL_EVALUATOR_DEVICE"):
        load_settings(EvaluatorSettings, "evaluator", environ={"FLYWHEEL_EVALUATOR_DEVICE": "gpu7"})


class MappedSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    urls: dict[str, str] = msgspec.field(default_factory=dict)
    limits: dict[str, int] = msgspec.field(default_factory=dict)


def test_a_dict_setting_is_a_json_object_in_the_environment():
    s = load_settings(MappedSettings, "trainer", environ={
        "FLYWHEEL_TRAINER_URLS": '{"inference": "http://inference:8100", "trainer": "http://t:8102"}',
        "FLYWHEEL_TRAINER_LIMITS": '{"a": "3"}'})
    assert s.urls == {"inference": "http://inference:8100", "trainer": "http://t:8102"} and s.limits == {"a": 3}
    assert load_settings(MappedSettings, "trainer", environ={"FLYWHEEL_TRAINER_URLS": ""}).urls == {}
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_URLS: must be a JSON object .*'inference=x'"):
        load_settings(MappedSettings, "trainer", environ={"FLYWHEEL_TRAINER_URLS": "inference=x"})
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_URLS: must be a JSON object, got '\\[1\\]'"):
        load_settings(MappedSettings, "trainer", environ={"FLYWHEEL_TRAINER_URLS": "[1]"})
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_LIMITS"):
        load_settings(MappedSettings, "trainer", environ={"FLYWHEEL_TRAINER_LIMITS": '{"a": "many"}'})


def test_every_service_declares_its_settings_and_all_load_with_defaults():
    from libs.common.settings import SERVICES, load_all, settings_class

    loaded = load_all(environ={})
    assert set(loaded) == set(SERVICES)
    for service in SERVICES:
        assert isinstance(loaded[service], settings_class(service))


def test_wrong_type_fails_loudly():
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_BATCH_SIZE: Expected `int`, got `str` \\(it is 'many'\\)"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_TRAINER_BATCH_SIZE": "many"})


def test_bad_log_level_fails():
    with pytest.raises(SettingsError, match="FLYWHEEL_LOG_LEVEL"):
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
    with pytest.raises(SettingsError, match="batchsize.*did you mean batch_size"):
        load_settings(DemoSettings, "trainer", environ={"FLYWHEEL_CONFIG": str(config)})


def test_unknown_toml_section_fails_in_every_service(tmp_path: Path):
    config = tmp_path / "f.toml"
    config.write_text("[evaluatr]\nbatch_size = 4\n")
    for service, cls in (("trainer", DemoSettings), ("cli", CommonSettings)):
        with pytest.raises(SettingsError, match=r"unknown section \[evaluatr\]; did you mean evaluator"):
            load_settings(cls, service, environ={"FLYWHEEL_CONFIG": str(config)})


def test_describe_masks_secrets():
    s = load_settings(DemoSettings, "inference", environ={"FLYWHEEL_INFERENCE_API_KEY": "sk-secret"})
    assert describe(s)["api_key"] == "***"


def test_nats_servers_without_url_is_a_clear_error():
    with pytest.raises(SettingsError, match="NATS_URL"):
        _ = load_settings(DemoSettings, "trainer", environ={}).nats_servers
