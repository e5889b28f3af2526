"""compose.yaml runs the same services as `flywheel up`; no Docker engine here, so parse and check it."""

from pathlib import Path

import yaml

from libs.common.settings import DEFAULT_PORTS, SERVICES

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_every_service_on_its_port():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(SERVICES) | {"nats"} == set(services)
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


def test_dockerfile_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in text and "COPY services" in text and "COPY libs" in text
