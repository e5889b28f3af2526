"""`flywheel up`'s supervisor with real processes: embedded nats-server, restart after kill -9, clean stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from flywheel.demo import free_port_base
from flywheel.supervisor import NATS_URL_FILE, Supervisor, child_environment, service_ports
from libs.common.settings import SettingsError
from tests.conftest import wait_for_sync


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.integration
@pytest.mark.slow
def test_child_killed_is_restarted_and_stop_is_clean(tmp_path: Path, tiny_model_dir: Path):
    data = tmp_path / "data"
    log = data / "logs" / "deployer.log"
    environ = {**os.environ, "FLYWHEEL_BASE_MODEL": str(tiny_model_dir)}  # no model to build here
    sup = Supervisor(data, port_base=free_port_base(), services=("deployer",), environ=environ, grace_s=30)

    def started(times: int) -> bool:
        """The deployer has finished starting `times` times and answers /ready.

        /ready alone is not enough: a service may answer it a moment before it logs that it
        started, and a kill in that moment leaves one start fewer in the log.
        """
        sup.poll()
        return log.read_text().count("service started") == times and _ready(sup.ports["deployer"])

    try:
        sup.start()
        assert sup.nats_url.startswith("nats://127.0.0.1:")
        assert (data / NATS_URL_FILE).read_text().strip() == sup.nats_url
        wait_for_sync(lambda: started(1), "the deployer to start")
        first = sup.children["deployer"].process
        os.kill(first.pid, signal.SIGKILL)
        wait_for_sync(lambda: started(2), "the killed deployer to be restarted and to start again")
        assert sup.children["deployer"].restarts == 1
        assert sup.children["deployer"].process.pid != first.pid

        # The embedded nats-server dies: it is restarted on the same URL, from the same store, and
        # the running deployer reconnects by itself (its /ready checks the bus).
        url, server = sup.nats_url, sup.nats.process
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        wait_for_sync(lambda: not _ready(sup.ports["deployer"]), "the deployer to notice NATS is gone")
        wait_for_sync(lambda: (sup.poll(), sup.nats.process.poll() is None and sup.nats_restarts == 1)[1],
                      "the supervisor to restart nats-server")
        assert sup.nats.url == url and sup.nats.process.pid != server.pid
        wait_for_sync(lambda: (sup.poll(), _ready(sup.ports["deployer"]))[1], "the deployer to reconnect")
        assert (data / "logs" / "nats-server.log.1").exists()  # the dead server's log kept
        assert sup.children["deployer"].restarts == 1  # reconnected, not restarted
    finally:
        sup.stop()
    child = sup.children["deployer"].process
    assert child.returncode == 0, "SIGTERM should stop a service cleanly with exit code 0"
    assert sup.nats.process.poll() is not None
    assert not (data / NATS_URL_FILE).exists()
    assert log.read_text().count("service started") == 2


def test_ports_and_environment_for_children(tmp_path: Path):
    ports = service_ports(9000)
    assert ports["inference"] == 9000 and ports["curriculum"] == 9005
    env = child_environment(tmp_path, "nats://x:1", ports, {"PATH": "/bin"})
    assert env["FLYWHEEL_NATS_URL"] == "nats://x:1" and env["FLYWHEEL_TRAINER_HTTP_PORT"] == "9002"
    assert env["FLYWHEEL_DATA_DIR"] == str(tmp_path)


def test_ports_set_in_the_environment_are_kept_unless_a_port_base_is_given(tmp_path: Path):
    shell = {"FLYWHEEL_INFERENCE_HTTP_PORT": "9100", "FLYWHEEL_DASHBOARD_HTTP_PORT": " 9106 "}
    sup = Supervisor(tmp_path / "data", environ=shell)
    assert sup.ports["inference"] == 9100 and sup.ports["dashboard"] == 9106
    assert sup.ports["trainer"] == service_ports(None)["trainer"]  # the default where none is set
    env = child_environment(tmp_path, "nats://x:1", sup.ports, shell)
    assert env["FLYWHEEL_INFERENCE_HTTP_PORT"] == "9100"  # what the service binds is what the supervisor shows
    assert service_ports(9000, shell)["inference"] == 9000  # --port-base speaks for every service
    with pytest.raises(SettingsError, match="FLYWHEEL_TRAINER_HTTP_PORT"):
        Supervisor(tmp_path / "data", environ={"FLYWHEEL_TRAINER_HTTP_PORT": "eighty"})


@pytest.mark.integration
@pytest.mark.slow
def test_external_nats_url_is_used_instead_of_starting_one(tmp_path: Path, nats_server: str, tiny_model_dir: Path):
    environ = {"NATS_URL": nats_server, "FLYWHEEL_BASE_MODEL": str(tiny_model_dir)}
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), services=(), environ=environ)
    sup.start()
    try:
        assert sup.nats is None and sup.nats_url == nats_server
    finally:
        sup.stop()


@pytest.mark.integration
def test_a_failed_start_leaves_no_server_behind(tmp_path: Path):
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), services=("deployer",),
                     environ={"FLYWHEEL_BASE_MODEL": str(tmp_path / "no-model")})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sup.start()
    assert sup.nats.process.poll() is not None
    assert not (tmp_path / "data" / NATS_URL_FILE).exists()


def test_up_checks_every_services_settings_before_starting_anything(tmp_path):
    from libs.common.settings import SettingsError

    sup = Supervisor(tmp_path / "data", port_base=None, environ={"FLYWHEEL_EVALUATOR_BATCH_SIZE": "0"})
    with pytest.raises(SettingsError, match="FLYWHEEL_EVALUATOR_BATCH_SIZE"):
        sup.start()
    assert sup.nats is None and not sup.children
