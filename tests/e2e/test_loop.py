"""The whole loop on the tiny model: submitted → accepted → trained → saved → scored → deployed → served.

Runs the same driver as `make demo` on a temporary data directory and free ports: a real
nats-server, the six services as child processes, real training steps, real HTTP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.demo import free_port_base, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]


def test_one_dataset_travels_the_whole_loop(tmp_path: Path):
    data_dir = tmp_path / "data"
    # Shorter training than the demo's; several checkpoints, each scored.
    result = run_demo(data_dir, port_base=free_port_base(), timeout_s=600,
                      extra_env={"FLYWHEEL_TRAINER_EPOCHS": "2", "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "20"})

    # Trained by the loop itself: the answer comes from a checkpoint the trainer wrote for this
    # dataset (run_demo matches the served sha256 against this trace's deployments).
    assert "/artifacts/checkpoints/ds-" in result.checkpoint_uri and len(result.checkpoint_sha256) == 64
    assert 0.0 <= result.exact_match <= 1.0 and result.val_loss > 0
    assert isinstance(result.answer, str)
    # One trace links the journey through every service on the way.
    assert len(result.trace_id) == 32
    assert {"gatekeeper", "trainer", "evaluator", "deployer"} <= set(result.trace_services)
    # The stack stopped cleanly and kept its logs.
    for service in ("gatekeeper", "trainer", "evaluator", "deployer", "inference", "curriculum"):
        log = (data_dir / "logs" / f"{service}.log").read_text()
        assert "service started" in log and '"stopped"' in log, f"{service} did not start/stop cleanly"
