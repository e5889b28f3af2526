"""compose.yaml runs the same services as `flywheel up`; no Docker engine here, so parse and check it."""

import re
from pathlib import Path

import yaml

from libs.common.settings import DEFAULT_PORTS, SERVICES, load_settings, settings_class

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
        assert svc["environment"]["FLYWHEEL_NATS_URL"] == "nats://nats:4222"
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"
        assert f"localhost:{port}/health" in " ".join(svc["healthcheck"]["test"])
        assert "flywheel-data:/data" in svc["volumes"]
    assert "-js" in services["nats"]["command"]


def test_jaeger_is_pinned_and_every_service_exports_its_spans_to_it():
    services = _compose()["services"]
    jaeger = services["jaeger"]
    # An official image at a release tag, never `latest`.
    assert re.fullmatch(r"jaegertracing/jaeger:\d+\.\d+\.\d+", jaeger["image"]), jaeger["image"]
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])  # the UI, OTLP over HTTP
    for name in SERVICES:
        env = _environment(services[name], {"FLYWHEEL_INFERENCE_API_KEY": "k"})
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert "jaeger" in services[name]["depends_on"], name
        # ...unless the host points them elsewhere.
        elsewhere = _environment(services[name], {"FLYWHEEL_INFERENCE_API_KEY": "k",
                                                  "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
        assert elsewhere["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"


def test_every_services_compose_environment_loads_through_the_settings_loader():
    services = _compose()["services"]
    host = {"FLYWHEEL_INFERENCE_API_KEY": "k"}
    for name in SERVICES:
        settings = load_settings(settings_class(name), name, _environment(services[name], host))
        assert settings.http_port == DEFAULT_PORTS[name] and settings.nats_url == "nats://nats:4222"
    dashboard = load_settings(settings_class("dashboard"), "dashboard", _environment(services["dashboard"], host))
    assert dashboard.trace_url == "http://localhost:16686/trace/{trace_id}"
    # Each service by its name in the compose network, on its own port.
    assert dashboard.service_urls == {name: f"http://{name}:{DEFAULT_PORTS[name]}" for name in SERVICES}


def test_dockerfile_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in text and "COPY services" in text and "COPY libs" in text
