"""Permissions from declarations, the server configuration, the secrets file and the client's
credentials: pure logic, no server (tests/libs/common/test_nats_secure.py runs them on one)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from libs.common import topology
from libs.common.events import CheckpointSaved, DatasetAccepted, ModelServing
from libs.common.nats_auth import NatsAuth
from libs.common.nats_permissions import (
    Permissions,
    State,
    Tls,
    covers,
    inbox_prefix,
    password_variable,
    read_secrets,
    render_config,
    service_permissions,
    wildcard,
    write_secrets,
)
from libs.common.service import Publish, Reply, Service, Subscribe
from libs.common.settings import CommonSettings, SettingsError, describe, load_settings


@pytest.mark.parametrize(("allowed", "subject", "expected"), [
    ("dataset.accepted.*", "dataset.accepted.high", True),
    ("dataset.accepted.*", "dataset.accepted.high.x", False),
    ("$JS.ACK.DATASETS.trainer-high.>", "$JS.ACK.DATASETS.trainer-high.1.2.3", True),
    ("$JS.ACK.DATASETS.trainer-high.>", "$JS.ACK.DATASETS.trainer-high", False),
    ("_INBOX.cli.>", "_INBOX.>", False),  # a wider subscription is not covered by a narrower grant
    ("_INBOX.cli.>", "_INBOX.cli.*", True),
    ("control.trainer.*", "control.trainer.*", True),
    ("control.trainer.pause", "control.trainer.*", False),
])
def test_covers_decides_as_nats_server_does(allowed: str, subject: str, expected: bool):
    assert covers(allowed, subject) is expected


def test_names():
    assert wildcard("dataset.accepted.{priority}") == "dataset.accepted.*"
    assert inbox_prefix("trainer") == "_INBOX.trainer"
    assert password_variable("dashboard") == "NATS_PASSWORD_DASHBOARD"


async def _noop(*_args):
    return None


def test_a_services_permissions_follow_its_declaration():
    service = Service(
        name="probe", settings=CommonSettings, build=_noop,
        subscriptions=(
            Subscribe(topology.DATASET_ACCEPTED, DatasetAccepted, _noop, consumers=topology.TRAINER),
            Subscribe(topology.MODEL_SERVING, ModelServing, _noop, every_replica=True),
        ),
        publications=(Publish(topology.CHECKPOINT_SAVED, CheckpointSaved),),
        replies=(Reply(topology.CONTROL_TRAINER_ACTION, ModelServing, ModelServing, _noop),),
    )
    perms = service_permissions(service, State(writes=(topology.TRAINER_BUCKET,)))
    assert perms.may_publish("checkpoint.saved") and not perms.may_publish("training.started")
    assert perms.may_publish("$JS.API.CONSUMER.MSG.NEXT.DATASETS.trainer-low")
    assert perms.may_publish("$JS.ACK.DATASETS.trainer-high.1.5.5.17.0")
    assert not perms.may_publish("$JS.API.CONSUMER.MSG.NEXT.DATASETS.gatekeeper")
    assert perms.may_publish("deadletter.dataset.accepted.normal") and not perms.may_publish("deadletter.dataset.submitted")
    assert perms.may_publish("$KV.failures.trainer-high.9") and not perms.may_publish("$KV.failures.gatekeeper.9")
    assert perms.may_publish("$JS.API.CONSUMER.CREATE.MODELS") and perms.may_publish("$JS.FC.MODELS.x.y")
    assert perms.may_subscribe("control.trainer.pause") and perms.allow_responses
    assert perms.may_publish("$KV.trainer.state") and not perms.may_publish("$KV.champion.current")
    # It publishes a checkpoint (an artifact) and receives datasets: it writes the object store.
    assert perms.may_publish("$O.artifacts.C.abc") and perms.may_publish("$JS.API.STREAM.PURGE.OBJ_artifacts")
    # Its own inbox only; every user may create the topology but delete nothing.
    assert perms.subscribe[0] == "_INBOX.probe.>" and not perms.may_subscribe("_INBOX.cli.x")
    assert perms.may_publish("$JS.API.STREAM.CREATE.DATASETS")
    assert not perms.may_publish("$JS.API.STREAM.DELETE.DATASETS")


def test_the_config_names_password_variables_and_holds_no_secret():
    perms = Permissions("inference", ("model.serving", "$JS.API.STREAM.INFO.MODELS"), ("_INBOX.inference.>",))
    text = render_config({"inference": perms}, tls=Tls("/tls/server.pem", "/tls/server.key", "/tls/ca.pem", verify=True))
    assert 'user: "inference"' in text and "password: $NATS_PASSWORD_INFERENCE" in text
    assert '"$JS.API.STREAM.INFO.MODELS"' in text  # quoted: never read as a variable
    assert "password: $NATS_PASSWORD_ADMIN" in text and "allow_responses" not in text
    assert 'cert_file: "/tls/server.pem"' in text and "verify: true" in text
    assert "store_dir" not in render_config({}, store_dir=None) and "monitor_port" not in render_config({}, monitor_port=None)


def test_secrets_are_written_0600_and_kept(tmp_path: Path):
    path = tmp_path / "deploy" / "secrets.env"
    first = write_secrets(path, ["gatekeeper", "admin"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == {"NATS_PASSWORD_GATEKEEPER", "NATS_PASSWORD_ADMIN"}
    # A letter first: nats-server reads the variable as a configuration value, never a number.
    assert all(value[0].isalpha() and len(value) >= 40 for value in first.values())
    second = write_secrets(path, ["gatekeeper", "trainer"])
    assert second["NATS_PASSWORD_GATEKEEPER"] == first["NATS_PASSWORD_GATEKEEPER"]
    assert read_secrets(path) == second and len(second) == 3


def test_credentials_come_from_the_settings_and_the_password_is_never_printed():
    settings = load_settings(CommonSettings, "cli", {"FLYWHEEL_NATS_USER": "cli", "FLYWHEEL_NATS_PASSWORD": "s3cret"})
    assert describe(settings)["nats_password"] == "***"
    assert "s3cret" not in repr(settings.nats_auth)
    options = settings.nats_auth.connect_options("cli")
    assert options == {"user": "cli", "password": "s3cret", "inbox_prefix": "_INBOX.cli"}
    # Without credentials nothing changes for nats-py (its default inbox).
    assert NatsAuth().connect_options("gatekeeper") == {}


@pytest.mark.parametrize(("env", "named"), [
    ({"FLYWHEEL_NATS_USER": "cli"}, "FLYWHEEL_NATS_PASSWORD"),
    ({"FLYWHEEL_NATS_PASSWORD": "p"}, "FLYWHEEL_NATS_USER"),
    ({"FLYWHEEL_NATS_TLS_CA_FILE": "/nonexistent/ca.pem"}, "FLYWHEEL_NATS_TLS_CA_FILE"),
    ({"FLYWHEEL_NATS_NKEY_SEED_FILE": "/nonexistent/seed"}, "FLYWHEEL_NATS_NKEY_SEED_FILE"),
    ({"FLYWHEEL_NATS_USER": "u", "FLYWHEEL_NATS_PASSWORD": "p", "FLYWHEEL_NATS_CREDS_FILE": __file__},
     "FLYWHEEL_NATS_CREDS_FILE"),
    ({"FLYWHEEL_NATS_TLS_CERT_FILE": __file__}, "FLYWHEEL_NATS_TLS_KEY_FILE"),
])
def test_incomplete_or_missing_credentials_stop_loading_naming_the_setting(env: dict, named: str):
    with pytest.raises(SettingsError, match=named):
        load_settings(CommonSettings, "cli", env)


def test_a_file_that_is_not_a_ca_is_named(tmp_path: Path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="FLYWHEEL_NATS_TLS_CA_FILE"):
        load_settings(CommonSettings, "cli", {"FLYWHEEL_NATS_TLS_CA_FILE": str(bogus)})


def test_tls_gives_nats_py_a_verifying_context(tmp_path: Path):
    ca = Path(ssl.get_default_verify_paths().cafile or "")
    if not ca.is_file():
        pytest.skip("no system CA bundle to load")
    options = NatsAuth(tls_ca_file=str(ca)).connect_options("gatekeeper")
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED and options["tls"].check_hostname
