"""The whole loop on the tiny model: submitted → accepted → trained → saved → scored → deployed → served.

Runs the same driver as `make demo` on a temporary data directory and free ports: a real
nats-server, the six services as child processes, real training steps, real HTTP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.demo import free_port_base, run_demo
from libs.common.artifacts import ArtifactStore

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

SERVICES = ("gatekeeper", "trainer", "evaluator", "deployer", "inference", "curriculum")


def test_one_dataset_travels_the_whole_loop(tmp_path: Path):
    data_dir = tmp_path / "data"
    # Shorter training than the demo's; several checkpoints, each scored.
    result = run_demo(data_dir, port_base=free_port_base(), timeout_s=600,
                      extra_env={"FLYWHEEL_TRAINER_EPOCHS": "2", "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "20"})

    # Trained by the loop itself: a checkpoint the trainer wrote for this dataset, on disk with
    # the content the deployer announced.
    assert "/artifacts/checkpoints/ds-" in result.checkpoint_uri
    ArtifactStore(data_dir / "artifacts").verify(result.checkpoint_uri, result.checkpoint_sha256)
    # What answered is exactly what the deployer deployed from this dataset's trace.
    assert (result.served_uri, result.served_sha256) == (result.checkpoint_uri, result.checkpoint_sha256)
    # Deployed only once inference reported serving the staged checkpoint.
    assert '"reported serving"' in (data_dir / "logs" / "inference.log").read_text()
    assert '"deployed"' in (data_dir / "logs" / "deployer.log").read_text()
    # One trace links the journey through all six services.
    assert len(result.trace_id) == 32
    assert set(SERVICES) <= set(result.trace_services), f"services in the trace: {result.trace_services}"
    # The stack stopped cleanly and kept its logs.
    for service in SERVICES:
        log = (data_dir / "logs" / f"{service}.log").read_text()
        assert "service started" in log and '"stopped"' in log, f"{service} did not start/stop cleanly"
