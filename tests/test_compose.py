"""compose.yaml runs the same services as `flywheel up`, on one host or two, each service as its own NATS user with
the permissions deploy/nats/nats.conf gives it; no Docker engine here, so parse and check both."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from flywheel.contract import CLIENTS, declarations
from flywheel.supervisor import nats_users
from libs.common.nats_permissions import ADMIN, CLI, Permissions, password_variable, render_config
from libs.common.nats_server import find_nats_server
from libs.common.settings import DEFAULT_PORTS, SERVICES, describe, load_settings, settings_class
from libs.common.topology import SUBJECT_PARAMETERS, stream_for

ROOT = Path(__file__).resolve().parents[1]
# What a shell-style ${VAR}, ${VAR:-default} or ${VAR:?error} in compose.yaml becomes.
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _interpolate(value: str, host: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms compose.yaml uses."""
    def one(match: re.Match) -> str:
        name, form, rest = match.groups()
        if host.get(name):
            return host[name]
        if form == ":?":
            raise AssertionError(f"compose needs {name} on the host: {rest}")
        return rest or ""

    return _VARIABLE.sub(one, value)


def _environment(service: dict, host: dict[str, str]) -> dict[str, str]:
    return {key: _interpolate(str(value), host) for key, value in service["environment"].items()}


TRAINING = {"nats", "jaeger", "gatekeeper", "trainer", "curriculum"}
SERVING = {"evaluator", "deployer", "inference", "dashboard"}
NATS_CONFIG = ROOT / "deploy" / "nats" / "nats.conf"
# The host's secrets file (flywheel nats-config --secrets), as compose reads it with --env-file.
SECRETS = {password_variable(user): f"pw-{user}" for user in (*SERVICES, CLI, ADMIN)}
HOST = {"FLYWHEEL_INFERENCE_API_KEY": "k", **SECRETS}


def test_compose_runs_every_service_on_its_port():
    services = _compose()["services"]
    assert set(SERVICES) | {"nats", "jaeger"} == set(services)
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert (ROOT / "services" / name / "__main__.py").is_file()
        port = DEFAULT_PORTS[name]
        assert svc["ports"] == [f"{port}:{port}"]
        assert svc["environment"][f"FLYWHEEL_{name.upper()}_HTTP_PORT"] == str(port)
        # Waits for NATS where it runs on the same host; elsewhere (serving host) it is not required.
        assert svc["depends_on"]["nats"] == {"condition": "service_healthy", "required": False}
        assert f"localhost:{port}/health" in " ".join(svc["healthcheck"]["test"])
        assert "flywheel-data:/data" in svc["volumes"]


def test_a_training_and_a_serving_profile_split_the_stack_over_two_hosts():
    services = _compose()["services"]
    assert {name for name, svc in services.items() if "training" in svc.get("profiles", [])} == TRAINING
    assert {name for name, svc in services.items() if "serving" in svc.get("profiles", [])} == SERVING
    assert all(len(svc["profiles"]) == 1 for svc in services.values())
    for name in SERVICES:
        env = _environment(services[name], HOST)
        # One host: NATS by its name in the network; the serving host points at the training host.
        assert env["FLYWHEEL_NATS_URL"] == "nats://nats:4222"
        assert _environment(services[name], {**HOST, "NATS_URL": "nats://train-1:4222"})["FLYWHEEL_NATS_URL"] == \
            "nats://train-1:4222"
        # No shared disk between the hosts: artifacts travel through the object store.
        assert env["FLYWHEEL_ARTIFACT_TRANSPORT"] == "nats"
    # Only NATS's client port and Jaeger's leave the training host; monitoring stays inside.
    assert services["nats"]["ports"] == ["4222:4222"]


def test_each_service_connects_as_its_own_user_with_its_own_password():
    services = _compose()["services"]
    for name in SERVICES:
        env = _environment(services[name], HOST)
        assert env["FLYWHEEL_NATS_USER"] == name
        assert env["FLYWHEEL_NATS_PASSWORD"] == f"pw-{name}"
        settings = load_settings(settings_class(name), name, env)
        assert settings.nats_auth.user == name and settings.nats_auth.password == f"pw-{name}"
        assert describe(settings)["nats_password"] == "***"
        # Without the secrets file compose stops, saying how to make it.
        with pytest.raises(AssertionError, match="flywheel nats-config --secrets"):
            _environment(services[name], {"FLYWHEEL_INFERENCE_API_KEY": "k"})


def test_the_nats_container_runs_the_committed_config_with_every_users_password():
    nats = _compose()["services"]["nats"]
    config = nats["command"][nats["command"].index("--config") + 1]
    assert f"./deploy/nats/nats.conf:{config}:ro" in nats["volumes"]
    referenced = set(re.findall(r"password: \$(\w+)", NATS_CONFIG.read_text()))
    assert referenced == set(SECRETS) == set(nats["environment"])
    env = _environment(nats, HOST)
    assert all(env[name] == SECRETS[name] for name in referenced)
    assert "nats-data:/data" in nats["volumes"] and '"/data/jetstream"' in NATS_CONFIG.read_text()
    # No secret is committed: the config only names variables, and the secrets file is ignored.
    assert "secrets.env" in (ROOT / "deploy" / "nats" / ".gitignore").read_text().split()


def test_the_committed_nats_config_is_what_the_declarations_give():
    assert NATS_CONFIG.read_text() == render_config(nats_users()), "run `flywheel nats-config`"


def _committed_permissions() -> dict[str, Permissions]:
    """The users of deploy/nats/nats.conf as the server reads them (the generator's format)."""
    users = {}
    for block in re.finditer(
            r'user: "(?P<user>[^"]+)"\s+password: \$\w+(?:\s+permissions: \{\s+publish: \{ allow: \[(?P<pub>[^\]]*)\] \}'
            r'\s+subscribe: \{ allow: \[(?P<sub>[^\]]*)\] \}(?P<responses>\s+allow_responses: true)?)?',
            NATS_CONFIG.read_text()):
        if block["pub"] is None:
            continue  # admin: unrestricted
        users[block["user"]] = Permissions(block["user"], tuple(re.findall(r'"([^"]+)"', block["pub"])),
                                           tuple(re.findall(r'"([^"]+)"', block["sub"])), bool(block["responses"]))
    return users


def _concrete(subject: str) -> str:
    return ".".join(str(SUBJECT_PARAMETERS[t[1:-1]]["enum"][0]) if t.startswith("{") else t for t in subject.split("."))


def test_the_committed_permissions_allow_what_each_service_declares():
    users = _committed_permissions()
    assert set(users) == {*SERVICES, CLI}
    for service in declarations():
        perms = users[service.name]
        assert perms.may_subscribe(f"_INBOX.{service.name}.x.y")
        for publication in service.publications:
            assert perms.may_publish(_concrete(publication.subject)), (service.name, publication.subject)
        for subscription in service.subscriptions:
            for c in subscription.consumers:
                assert perms.may_publish(f"$JS.API.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}"), c.durable
                assert perms.may_publish(f"$JS.ACK.{c.stream}.{c.durable}.1.2.3.4.5"), c.durable
                assert perms.may_publish(f"deadletter.{c.filter_subject}"), c.durable
                assert perms.may_publish(f"$KV.failures.{c.durable}.17"), c.durable
            if subscription.every_replica:
                assert perms.may_publish(f"$JS.API.CONSUMER.CREATE.{stream_for(subscription.subject)}")
        for reply in service.replies:
            assert perms.may_subscribe(reply.subject.replace("{action}", "*")) and perms.allow_responses
        assert perms.allow_responses == bool(service.replies), service.name
    cli = users[CLI]
    for client in CLIENTS:
        if client.name == "flywheel CLI":
            assert all(cli.may_publish(_concrete(r.subject)) for r in (*client.publications, *client.requests))


def test_the_committed_permissions_refuse_what_a_service_does_not_declare():
    users = _committed_permissions()
    services = declarations()
    published = {_concrete(p.subject) for s in services for p in s.publications}
    answered = {r.subject.replace("{action}", "*") for s in services for r in s.replies}
    consumers = {(c.stream, c.durable) for s in services for sub in s.subscriptions for c in sub.consumers}
    for service in services:
        perms = users[service.name]
        own = {_concrete(p.subject) for p in service.publications}
        for subject in published - own:
            assert not perms.may_publish(subject), f"{service.name} may publish {subject}"
        for subject in answered - {r.subject.replace("{action}", "*") for r in service.replies}:
            assert not perms.may_subscribe(subject), f"{service.name} may answer {subject}"
        mine = {(c.stream, c.durable) for sub in service.subscriptions for c in sub.consumers}
        for stream, durable in consumers - mine:
            assert not perms.may_publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"), (service.name, durable)
            assert not perms.may_publish(f"$JS.ACK.{stream}.{durable}.1"), (service.name, durable)
        # Nobody else's inbox, no deleting or purging Flywheel's streams and consumers, no `>`.
        assert not perms.may_subscribe("_INBOX.cli.x") and not perms.may_subscribe("_INBOX.>")
        for stream in ("DATASETS", "MODELS", "KV_champion"):
            assert not perms.may_publish(f"$JS.API.STREAM.DELETE.{stream}")
            assert not perms.may_publish(f"$JS.API.STREAM.PURGE.{stream}")
        assert not perms.may_publish("$JS.API.CONSUMER.DELETE.DATASETS.gatekeeper")
        assert ">" not in perms.publish and ">" not in perms.subscribe
    # The example from the brief: inference serves models, it never accepts datasets.
    assert not users["inference"].may_publish("dataset.accepted.high")
    assert not users["inference"].may_publish("$KV.champion.current")
    assert users["deployer"].may_publish("$KV.champion.current")


@pytest.mark.integration
def test_nats_server_accepts_the_committed_config(tmp_path: Path):
    """The real server parses it, every password variable set (and refuses it with one unset)."""
    server = find_nats_server()
    checked = subprocess.run([server, "-c", str(NATS_CONFIG), "-t"], env={**os.environ, **SECRETS},
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr
    missing = {k: v for k, v in SECRETS.items() if k != "NATS_PASSWORD_TRAINER"}
    checked = subprocess.run([server, "-c", str(NATS_CONFIG), "-t"], env={**os.environ, **missing},
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode != 0 and "NATS_PASSWORD_TRAINER" in checked.stderr


def test_jaeger_is_pinned_and_every_service_exports_its_spans_to_it():
    services = _compose()["services"]
    jaeger = services["jaeger"]
    # An official image at a release tag, never `latest`.
    assert re.fullmatch(r"jaegertracing/jaeger:\d+\.\d+\.\d+", jaeger["image"]), jaeger["image"]
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])  # the UI, OTLP over HTTP
    for name in SERVICES:
        env = _environment(services[name], HOST)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert "jaeger" in services[name]["depends_on"], name
        # ...unless the host points them elsewhere (the serving host: the training host's Jaeger).
        elsewhere = _environment(services[name], {**HOST, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
        assert elsewhere["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"


def test_every_services_compose_environment_loads_through_the_settings_loader():
    services = _compose()["services"]
    for name in SERVICES:
        settings = load_settings(settings_class(name), name, _environment(services[name], HOST))
        assert settings.http_port == DEFAULT_PORTS[name] and settings.nats_url == "nats://nats:4222"
    dashboard = load_settings(settings_class("dashboard"), "dashboard", _environment(services["dashboard"], HOST))
    assert dashboard.trace_url == "http://localhost:16686/trace/{trace_id}"
    # Each service by its name in the compose network, on its own port...
    assert dashboard.service_urls == {name: f"http://{name}:{DEFAULT_PORTS[name]}" for name in SERVICES}
    # ...or, on the serving host, the training host's services (and Jaeger) on that host.
    apart = load_settings(settings_class("dashboard"), "dashboard",
                          _environment(services["dashboard"], {**HOST, "TRAINING_HOST": "train-1"}))
    assert apart.trace_url == "http://train-1:16686/trace/{trace_id}"
    assert apart.service_urls == {name: f"http://{'train-1' if services[name]['profiles'] == ['training'] else name}:"
                                  f"{DEFAULT_PORTS[name]}" for name in SERVICES}


def test_dockerfile_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in text and "COPY services" in text and "COPY libs" in text
