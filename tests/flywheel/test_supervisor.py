"""`flywheel up`'s supervisor with real processes: embedded nats-server, restart after kill -9, clean stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from flywheel.demo import free_port_base
from flywheel.supervisor import NATS_URL_FILE, Supervisor, child_environment, service_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_healthy(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing ready on :{port}")


def test_child_killed_is_restarted_and_stop_is_clean(tmp_path: Path):
    base = free_port_base()
    sup = Supervisor(tmp_path / "data", port_base=base, services=("deployer",), environ=dict(os.environ), grace_s=10)
    sup.start()
    try:
        assert sup.nats_url.startswith("nats://127.0.0.1:")
        assert (tmp_path / "data" / NATS_URL_FILE).read_text().strip() == sup.nats_url
        port = sup.ports["deployer"]
        _wait_healthy(port)
        first = sup.children["deployer"].process
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sup.poll()
            proc = sup.children["deployer"].process
            if proc is not None and proc.pid != first.pid:
                break
            time.sleep(0.2)
        assert sup.children["deployer"].restarts == 1
        _wait_healthy(port)
    finally:
        sup.stop()
    child = sup.children["deployer"].process
    assert child.returncode == 0, "SIGTERM should stop a service cleanly with exit code 0"
    assert sup.nats.process.poll() is not None
    assert not (tmp_path / "data" / NATS_URL_FILE).exists()
    log = (tmp_path / "data" / "logs" / "deployer.log").read_text()
    assert log.count("service started") == 2


def test_ports_and_environment_for_children(tmp_path: Path):
    ports = service_ports(9000)
    assert ports["inference"] == 9000 and ports["curriculum"] == 9005
    env = child_environment(tmp_path, "nats://x:1", ports, {"PATH": "/bin"})
    assert env["FLYWHEEL_NATS_URL"] == "nats://x:1" and env["FLYWHEEL_TRAINER_HTTP_PORT"] == "9002"
    assert env["FLYWHEEL_DATA_DIR"] == str(tmp_path)


def test_external_nats_url_is_used_instead_of_starting_one(tmp_path: Path, nats_server: str):
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), services=(), environ={"NATS_URL": nats_server})
    sup.start()
    try:
        assert sup.nats is None and sup.nats_url == nats_server
    finally:
        sup.stop()
