"""The runtime as a process: a wrong setting stops it at once with its name; SIGTERM ends it at any stage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "NATS_URL"}
    return {**clean, "FLYWHEEL_DATA_DIR": str(tmp_path / "data"), **extra}


@pytest.mark.parametrize(("command", "variable"), [
    (["-m", "services.evaluator"], {"FLYWHEEL_EVALUATOR_BATCH_SIZE": "0"}),
    (["-m", "services.inference"], {"FLYWHEEL_INFERENCE_DEVICE": "gpu7"}),
    (["-m", "services.evaluator"], {"FLYWHEEL_EVALUATR_BATCH_SIZE": "8"}),
    (["-m", "flywheel.cli", "status"], {"FLYWHEEL_DATADIR": "/x"}),
])
def test_a_wrong_setting_stops_the_program_at_once_naming_it(tmp_path: Path, command: list[str], variable: dict):
    [name] = variable
    result = subprocess.run([sys.executable, *command], env=env(tmp_path, **variable), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert name in result.stderr and "Traceback" not in result.stderr


def test_a_service_that_cannot_reach_nats_says_so_once_and_stops_on_sigterm(tmp_path: Path):
    port = closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.deployer"],
        env=env(tmp_path, FLYWHEEL_NATS_URL=f"nats://127.0.0.1:{port}", FLYWHEEL_DEPLOYER_HTTP_PORT="0"),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        for line in proc.stderr:  # waits on the process's own words, not on a clock
            lines.append(line)
            if "cannot reach NATS" in line:
                break
        assert any(f"127.0.0.1:{port}" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        rest = proc.stderr.read()
        assert rest.count("cannot reach NATS") == 0, "the failure is reported once, not on every retry"
        assert "start-up abandoned" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_service_gives_up_on_nats_after_its_deadline(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "services.deployer"],
        env=env(tmp_path, FLYWHEEL_NATS_URL=f"nats://127.0.0.1:{closed_port()}", FLYWHEEL_DEPLOYER_HTTP_PORT="0",
                FLYWHEEL_NATS_CONNECT_DEADLINE_S="2"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "within 2 s" in result.stderr


@pytest.mark.integration
def test_sigterm_while_a_model_is_being_built_ends_the_service_within_its_grace(tmp_path: Path, nats_server: str):
    # No base model configured: the trainer creates the tiny one while building (seconds of work
    # in a thread that cannot be cancelled).
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer"],
        env=env(tmp_path, FLYWHEEL_NATS_URL=nats_server, FLYWHEEL_TRAINER_HTTP_PORT="0"),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stderr:
            if "building the service" in line:
                break
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 15
        rest = proc.stderr.read()
        assert "start-up abandoned" in rest and "service started" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_port_in_use_is_reported_and_the_service_exits_cleanly(tmp_path: Path, nats_server: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.deployer"],
            env=env(tmp_path, FLYWHEEL_NATS_URL=nats_server, FLYWHEEL_DEPLOYER_HTTP_PORT=str(port)),
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"could not start on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_torch_threads_default_to_half_the_cores_and_follow_the_setting(monkeypatch):
    import torch

    from libs.common.runtime import limit_torch_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        assert limit_torch_threads(0) == 4 and torch.get_num_threads() == 4 and os.environ["OMP_NUM_THREADS"] == "4"
        monkeypatch.setattr(os, "cpu_count", lambda: 1)
        assert limit_torch_threads(0) == 1 and torch.get_num_threads() == 1
        assert limit_torch_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
