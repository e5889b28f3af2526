"""The whole loop on the tiny model: submitted → accepted → trained → saved → scored → deployed → served.

Runs the same driver as `make demo` on a temporary data directory and free ports: a real
nats-server, the six services as child processes, real training steps, real HTTP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.demo import free_port_base, run_demo
from libs.common.artifacts import ArtifactStore
from libs.common.tracing import read_trace

# How long to wait is the demo's own (flywheel.demo.Pace): it follows the training speed it
# measures and fails a stalled run after STALL_S with what it waited for. This timeout is a
# backstop for what that cannot see (a hang while the stack stops) and for a machine so slow
# that the run would take over 40 minutes (a 2-core machine with one core busy needs about 5).
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

SERVICES = ("gatekeeper", "trainer", "evaluator", "deployer", "inference", "curriculum")


# The demo's run (its token budget and threads), with the base model scored first: it is the
# first champion, so the trained checkpoint must beat it beyond the noise (the paired sign test
# at p <= 0.05: at least 5 of the 48 level-1 items right where the base is wrong). The
# curriculum raises the level after one evaluation at >= 10 % (instead of three at >= 80 %), so
# the level rule is exercised end to end on real scores.
E2E_ENV = {
    "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "400",
    "FLYWHEEL_EVALUATOR_SCORE_BASE_MODEL": "true",
    "FLYWHEEL_CURRICULUM_WINDOW": "1",
    "FLYWHEEL_CURRICULUM_THRESHOLD": "0.1",
}


def test_one_dataset_travels_the_whole_loop_and_the_model_gets_better(tmp_path: Path):
    data_dir = tmp_path / "data"
    result = run_demo(data_dir, port_base=free_port_base(), extra_env=E2E_ENV, wait_for_level_change=True)

    # The model answers the demo's five novel questions (no commuted twin, no conversion seen as
    # a step of a trained sum) as the demo promises: at least four of them right.
    right = sum(a.correct for a in result.answers)
    assert len(result.answers) == 5 and right >= 4, [(a.question, a.answer, a.expected) for a in result.answers]

    # Trained by the loop itself: a checkpoint the trainer wrote for this dataset, on disk with
    # the content the deployer announced.
    assert "/artifacts/checkpoints/ds-" in result.checkpoint_uri
    ArtifactStore(data_dir / "artifacts").verify(result.checkpoint_uri, result.checkpoint_sha256)
    # What answered is exactly what the deployer deployed from this dataset's trace.
    assert (result.served_uri, result.served_sha256) == (result.checkpoint_uri, result.checkpoint_sha256)
    # Promoted over the base model beyond the noise, on the same items.
    assert "sign test" in result.promotion_reason and result.exact_match >= 0.1, result.promotion_reason
    # The curriculum saw a real evaluation reach the (shortened) bar and raised Binary's level.
    change = result.level_changes[0]
    assert (change.skill, change.previous_level, change.level) == ("binary", 1, 2) and change.accuracy >= 0.1
    # Deployed only once inference reported serving the staged checkpoint.
    assert '"reported serving"' in (data_dir / "logs" / "inference.log").read_text()
    assert '"deployed"' in (data_dir / "logs" / "deployer.log").read_text()
    # One trace links the journey through all six services.
    assert len(result.trace_id) == 32
    assert set(SERVICES) <= set(result.trace_services), f"services in the trace: {result.trace_services}"
    # ...from submission to the first answer served by the model this dataset produced: recorded
    # by inference under its load of that checkpoint, once.
    spans = read_trace(data_dir, result.trace_id)
    [first] = [s for s in spans if s["name"] == "first answer"]
    load = next(s for s in spans if s["span_id"] == first["parent_id"])
    assert (first["service"], load["service"], load["name"]) == ("flywheel-inference",) * 2 + ("model load",)
    assert first["attributes"]["flywheel.checkpoint.sha256"] == result.checkpoint_sha256
    assert first["attributes"]["flywheel.model.uri"] == result.checkpoint_uri
    assert first["start_ns"] >= load["end_ns"] and spans[0]["name"] == "flywheel submit"
    # The stack stopped cleanly and kept its logs.
    for service in SERVICES:
        log = (data_dir / "logs" / f"{service}.log").read_text()
        assert "service started" in log and '"stopped"' in log, f"{service} did not start/stop cleanly"
